"""The training prompt of a person token: re-encoded by the text encoder at every step from the
token's current vectors, so that the loss's gradient reaches them."""

from typing import TYPE_CHECKING

from ..errors import PVAError
from ..host.text import encode, is_vocabulary_word, mentions, tokenize_with_token
from ..method.person_token import PersonToken

if TYPE_CHECKING:
    from comfy.sd import CLIP


def check_token_prompt(clip: "CLIP", prompt: str, token: PersonToken, input_name: str = "prompt") -> None:
    """The token must be written in the prompt, and its name must not already be a word."""
    if is_vocabulary_word(clip, token.name):
        raise PVAError(
            f"person_token: {token.name!r} is already a word CLIP knows, so the person would be confused "
            f"with its meaning; choose a name CLIP splits into pieces (e.g. '{token.name}_pva')."
        )
    if mentions(prompt, token.name) == 0:
        raise PVAError(
            f"{input_name}: it does not contain the person token; write {token.prompt_word} where the person "
            f"is named, e.g. 'photo of {token.prompt_word} {token.class_word or 'person'}'."
        )


class TokenPrompt:
    def __init__(self, clip: "CLIP", text: str, token: PersonToken):
        check_token_prompt(clip, text, token)
        self.clip, self.text, self.token = clip, text, token

    def with_token(self, token: PersonToken) -> "TokenPrompt":
        return TokenPrompt(self.clip, self.text, token)

    def encode(self) -> list:
        """The CONDITIONING of the prompt with the token's current vectors (differentiable
        inside the training session)."""
        vectors = dict(self.token.vectors.items())
        return encode(self.clip, tokenize_with_token(self.clip, self.text, self.token.name, vectors))
