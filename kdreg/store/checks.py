"""What a teacher store cannot replay, refused one line each before anything runs or is written."""

from __future__ import annotations

from typing import Any

from kdreg.recipe import Recipe, StageConfig

#: augmentations drawn per pixel or per batch that no stored crop and flip rebuild
_NOT_REPLAYED = {
    "auto_augment": "an automatic augmentation policy (RandAugment, AutoAugment, AugMix) draws "
                    "photometric operations a store's crop and flip do not rebuild",
    "color_jitter": "colour jitter is photometric: a store's crop and flip do not rebuild it",
    "re_prob": "random erasing draws boxes per batch that a store does not hold",
    "mixup": "mixup pairs the images of a batch; a store holds one image's view per row, not "
             "batches (their pairs and lambdas would tie it to the batch size), and kdreg never "
             "mixes stored outputs as an approximation",
    "cutmix": "CutMix pairs the images of a batch; a store holds one image's view per row, not "
              "batches, and kdreg never mixes stored outputs as an approximation",
}
_OFF = {"auto_augment": None, "color_jitter": 0.0, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0}


def recipe_problems(recipe: Recipe, stage: StageConfig, path: str) -> list[str]:
    """Why stage ``stage`` (at recipe key ``path``) cannot learn from a teacher store: an
    augmentation the store does not replay, feature losses, a bridge (the streamed path's transform
    is checked once the data is read: :class:`kdreg.store.streamed.ViewMaker`)."""
    augment: Any = recipe.data.augment
    problems = [f"data.augment.{key} = {getattr(augment, key)!r}: {why}; a teacher store refuses it "
                f"({path}.teacher_store) @ recipe.data.augment.{key}"
                for key, why in _NOT_REPLAYED.items() if getattr(augment, key) != _OFF[key]]
    if stage.feature_losses:
        problems.append(f"feature losses read the teacher's features, and a teacher store holds its "
                        f"logits alone; drop teacher_store or the feature losses @ {path}.feature_losses")
    if stage.bridge is not None:
        problems.append(f"a bridge runs the teacher's layers on the student's features, and a teacher "
                        f"store holds its logits alone; drop teacher_store or the bridge @ {path}.bridge")
    return problems

