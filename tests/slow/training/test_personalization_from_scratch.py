"""Acceptance of the from-scratch recipe: without a pretrained PVA model, Quick Personalize's
default (PVA + person token, 40 steps) learns *this* person, measured on photos held out from
its training (harness/from_scratch.py; bench/personalization_from_scratch.py is the full table)."""

import pytest
from harness.from_scratch import FromScratchWorld, held_out_loss, train, training_photos

from pva.training.personalize import TrainingSettings
from pva.training.recipe import FROM_SCRATCH_LEARNING_RATE

STEPS = TrainingSettings().steps  # the node's default
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def world():
    return FromScratchWorld(people=3)


def measure(world: FromScratchWorld, photos_of=None) -> dict:  # noqa: ANN001
    """Per (person, seed): the base's held-out loss, the own model's, and that of the model
    trained on the next person, all on this person's held-out photo. `photos_of(person)`: whose
    photos the person's model trains on (the break: everyone gets the first person's)."""
    people = list(world.people)
    models, figures = {}, {}
    for seed in SEEDS:
        for person in people:
            source = photos_of(person) if photos_of else person
            settings = TrainingSettings(steps=STEPS, learning_rate=FROM_SCRATCH_LEARNING_RATE, seed=seed)
            start = world.fresh_pva(seed)
            models[person, seed] = train(
                world, start, world.start_token(), training_photos(world.people[source]), settings, [STEPS]
            )[STEPS][0]
        for index, person in enumerate(people):
            other = people[(index + 1) % len(people)]
            data = world.people[person]
            figures[person, seed] = dict(
                none=held_out_loss(world, world.model, world.fresh_pva(seed), data, identity=False),
                own=held_out_loss(world, world.model, models[person, seed], data, identity=True),
                other=held_out_loss(world, world.model, models[other, seed], data, identity=True),
            )
    return figures


def verdict(figures: dict) -> tuple[float, float, float, float]:
    """(mean gain over the base, its seed spread, mean specificity, its seed spread): gain =
    base loss / own model's; specificity = the other person's model's loss / own model's."""
    gains, specific = {}, {}
    for (_, seed), f in figures.items():
        gains.setdefault(seed, []).append(f["none"] / f["own"])
        specific.setdefault(seed, []).append(f["other"] / f["own"])

    def mean_and_spread(by_seed: dict) -> tuple[float, float]:
        means = [sum(v) / len(v) for v in by_seed.values()]
        return sum(means) / len(means), max(means) - min(means)

    return (*mean_and_spread(gains), *mean_and_spread(specific))


@pytest.mark.slow
@pytest.mark.claims
@pytest.mark.test_models("synthetic-people", "world-base", "world-decoder", "sd15-inpainting-small-random")
def test_from_scratch_personalization_learns_the_person_on_held_out_photos(world):
    """Three held-out people, two seeds, 40 steps of PVA + person token from an initialized PVA
    model: on each person's held-out photo the own model beats the base by more than the seed
    spread, and beats the model trained on another person by more than that spread (the
    control: another person's photos must not serve as this person's)."""
    gain, gain_spread, specific, specific_spread = verdict(measure(world))
    print(f"\n[from scratch] gain over the base {gain:.4f} (seed spread {gain_spread:.4f}); own vs other's model {specific:.4f} (spread {specific_spread:.4f})")  # fmt: skip
    assert gain - 1 > gain_spread, (gain, gain_spread)
    assert specific - 1 > specific_spread, (specific, specific_spread)
