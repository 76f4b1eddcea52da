"""Measurements of a quick-personalization run shared by the training tests."""

import copy
import itertools

import torch

from pva.training.personalize import Personalizer, TrainingSettings, encode_inpaint_targets
from pva.training.session import training_mode


def held_out_loss(model, vae, positive, pva, data, face_only=None, time_bins: int = 8):  # noqa: ANN001, ANN201
    """Mean held-out loss over the person's photos, on fixed noise and timesteps."""
    with training_mode():
        targets = encode_inpaint_targets(data, vae, positive)
        with Personalizer(model, pva, data, targets, TrainingSettings(time_bins=time_bins)) as run:
            return sum(run.held_out_loss(i, face_only=face_only) for i in range(data.count)) / data.count


def saved_for_backward(model, vae, positive, pva, data, **settings):
    """(bytes autograd keeps for the backward of one training loss, weights not counted; the
    activation memory the training requests for it), measured with saved-tensor hooks."""
    with training_mode():
        targets = encode_inpaint_targets(data, vae, positive)
        with Personalizer(model, copy.deepcopy(pva), data, targets, TrainingSettings(**settings)) as run:
            weights = {
                t.untyped_storage().data_ptr()
                for t in itertools.chain(
                    model.model.parameters(), model.model.buffers(), run.pva.parameters()
                )
            }
            kept = {}

            def pack(tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in weights:
                    kept[storage.data_ptr()] = storage.nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                run.target_loss(0, torch.Generator().manual_seed(0))
            return sum(kept.values()), run.activation_memory()
