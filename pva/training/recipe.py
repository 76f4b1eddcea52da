"""Which personalization recipe a run uses.

- "PVA only": the paper's recipe from a pretrained PVA model: the identity encoder and W'q/W'k/W'v
  train; the prompt stays as written.
- "PVA + person token": the research code's recipe for a model without pretraining: a person token
  (a new word, started from a class word such as 'person') trains beside them through the text
  encoder, and carries the person where a never-trained identity encoder cannot.
- "auto": "PVA + person token" when the PVA model was never pretrained (its provenance says so),
  otherwise "PVA only" (plus a token when one is named).
"""

from ..errors import PVAError
from ..method.model import PVAModel
from ..method.person_token import check_token_name

RECIPES = ("auto", "PVA only", "PVA + person token")
# The learning rate of the PVA parameters from scratch (a never-trained encoder and projections
# copied from the base): the rate measured on the test world for pretraining and personalization
# (bench/personalization_from_scratch.py); the node's default 1e-4 is the paper's, for a
# pretrained PVA model. The shipped from-scratch workflow sets it.
FROM_SCRATCH_LEARNING_RATE = 1e-3


def resolve_recipe(recipe: str, pva: PVAModel, person_token: str) -> tuple[bool, str]:
    """(whether a person token trains, a sentence saying what runs and why)."""
    if recipe not in RECIPES:
        raise PVAError(f"recipe: one of {RECIPES}, got {recipe!r}.")
    named = bool(person_token.strip())
    if recipe == "PVA only":
        if named:
            raise PVAError(
                f"person_token: the 'PVA only' recipe trains no token; clear person_token ({person_token!r}) "
                "or choose 'PVA + person token'."
            )
        return False, "recipe PVA only (chosen): identity encoder and projections train."
    origin = "pretrained" if pva.is_pretrained else "never pretrained"
    needs_token = recipe == "PVA + person token" or not pva.is_pretrained
    if needs_token and not named:
        why = "chosen" if recipe != "auto" else f"auto: this PVA model was {origin}"
        raise PVAError(
            f"person_token: the 'PVA + person token' recipe ({why}) learns the person as a new word; name it "
            "(e.g. 'anna_pva') and write embedding:<name> in the prompt. From a pretrained PVA model, "
            "'PVA only' needs no token."
        )
    if named:
        check_token_name(person_token)
        why = "chosen" if recipe != "auto" else f"auto: the PVA model was {origin}"
        return (
            True,
            f"recipe PVA + person token ({why}): the token embedding:{person_token.strip()} trains too.",
        )
    return False, f"recipe PVA only (auto: the PVA model was {origin})."
