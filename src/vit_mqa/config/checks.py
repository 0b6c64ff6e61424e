"""The checks of every config section, in one place and one style: each problem is one
line (``VitMqaError``) that names the setting, the allowed range and the value given. A
run directory is something people download, so the bounds also keep a config.json from
making the loader allocate without limit. The dataclasses of :mod:`vit_mqa.config.sections` call
these when made and from ``validate()``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import MAX_IMAGE_SIDE, VitMqaError

# Bounds on what a config may ask for.
MAX_TOKENS = 65536
MAX_DEPTH = 256
MAX_STEM_CONVS = 8
MAX_PARAMETERS = 2_000_000_000

IDX_DATASETS = ("mnist", "fashion-mnist")
RESIZES = ("stretch", "pad", "center-crop")
# What prediction does to people's pictures first: a resize, or a dataset's own procedure
# (data.preprocess).
PROCEDURES = (*RESIZES, *IDX_DATASETS)
# Settings whose value is one of a few names; the flags list them.
CHOICES: dict[str, tuple[str, ...]] = {
    "stem": ("patch", "conv", "cct"),
    "pooling": ("cls", "mean", "seq"),
    "pos_embed": ("learned", "sincos2d"),
    "resize": RESIZES,
    "init_normalization": ("source", "data"),
    "select": ("best", "last"),
    "distill": ("soft", "hard"),
}


def image_pair(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise VitMqaError(f"image_size must be an int or (height, width), got {value!r}")
    return (int(value[0]), int(value[1]))


def _check_choice(section: str, name: str, value: str) -> None:
    if value not in CHOICES[name]:
        raise VitMqaError(f"{section}.{name} must be one of {', '.join(CHOICES[name])}, "
                          f"got {value!r}")


def check_model(c: Any) -> None:
    """The checks of a ViTConfig: one line per problem."""
    check_field_types(c, "model")
    h, w = c.image_size
    positive = ("patch_size", "in_channels", "num_classes", "dim", "depth", "num_heads")
    for name in positive:
        if getattr(c, name) < 1:
            raise VitMqaError(f"{name} must be >= 1, got {getattr(c, name)}")
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise VitMqaError(f"image_size must be 1 to {MAX_IMAGE_SIDE} per side, "
                          f"got {c.image_size}")
    if c.depth > MAX_DEPTH:
        raise VitMqaError(f"depth must be <= {MAX_DEPTH}, got {c.depth}")
    if h % c.patch_size or w % c.patch_size:
        raise VitMqaError(
            f"patch_size {c.patch_size} does not divide image size {h}x{w}"
        )
    if c.dim % c.num_heads:
        raise VitMqaError(f"dim {c.dim} is not divisible by num_heads {c.num_heads}")
    if c.num_kv_heads < 1 or c.num_heads % c.num_kv_heads:
        raise VitMqaError(
            f"num_kv_heads {c.num_kv_heads} must be a divisor of num_heads "
            f"{c.num_heads} (1 = multi-query, {c.num_heads} = multi-head)"
        )
    _check_choice("model", "stem", c.stem)
    if c.stem in ("conv", "cct"):
        # Each 3x3 stride-2 convolution or max-pooling (padding 1) maps a side s to
        # ceil(s / 2).
        halvings = len(c.stem_widths)
        grid = tuple(-(-side // 2**halvings) for side in (h, w))
        if c.patch_size < 2 or grid != c.grid_size:
            raise VitMqaError(
                f"stem {c.stem!r} halves the image {halvings} times, which makes a "
                f"{grid[0]}x{grid[1]} grid from {h}x{w}, not the {c.grid_size[0]}x"
                f"{c.grid_size[1]} of patch_size {c.patch_size}; use a patch_size "
                f"of 2 or more whose halvings reach that grid (a power of two always does)")
    if not 1 <= c.stem_convs <= MAX_STEM_CONVS:
        raise VitMqaError(f"stem_convs must be 1 to {MAX_STEM_CONVS}, got {c.stem_convs}")
    if c.stem_convs != 1 and c.stem != "cct":
        raise VitMqaError(f"stem_convs applies to the \"cct\" stem only; this model's stem "
                          f"is {c.stem!r} (drop stem_convs or set stem cct)")
    _check_choice("model", "pooling", c.pooling)
    _check_choice("model", "pos_embed", c.pos_embed)
    if not 0 < c.mlp_ratio <= 64 or c.dim * c.mlp_ratio < 1:
        raise VitMqaError(f"mlp_ratio must be in (0, 64] and give an MLP of at least one "
                          f"unit, got {c.mlp_ratio} (with dim {c.dim})")
    for name in ("dropout", "attn_dropout", "drop_path"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise VitMqaError(f"{name} must be in [0, 1), got {getattr(c, name)}")
    if not 0 < c.norm_eps < 1:
        raise VitMqaError(f"norm_eps must be in (0, 1), got {c.norm_eps}")
    if c.num_patches + c.num_prefix_tokens > MAX_TOKENS:
        raise VitMqaError(f"{c.num_patches} patches is more than {MAX_TOKENS} tokens; "
                          "use a larger patch_size or a smaller image_size")
    if c.num_parameters() > MAX_PARAMETERS:
        raise VitMqaError(f"this config has {c.num_parameters():,} parameters, more "
                          f"than the limit of {MAX_PARAMETERS:,}")
    if c.classes is not None:
        c.classes = checked_classes(c.classes, c.num_classes)
    if c.preprocess is not None:
        c.preprocess = checked_preprocess(c.preprocess, c.in_channels)


def checked_classes(classes: object, num_classes: int) -> list[str]:
    """A model's class names: one string per output."""
    if not (isinstance(classes, (list, tuple)) and all(isinstance(n, str) for n in classes)):
        raise VitMqaError(f"\"classes\" must be a list of names, got {classes!r}"[:200])
    if len(classes) != num_classes:
        raise VitMqaError(f"config lists {len(classes)} classes but the model has "
                          f"{num_classes} outputs")
    return list(classes)


PREPROCESS_KEYS = ("mean", "std", "resize", "procedure")


def checked_preprocess(d: object, in_channels: int) -> dict[str, Any]:
    """A model's preprocessing as its config holds it: {"mean", "std"} per channel and the
    "resize" and "procedure" names, every value checked (a config.json may come from a
    download)."""
    if not isinstance(d, dict):
        raise VitMqaError(f"\"preprocess\" must be an object, got {type(d).__name__}")
    unknown = sorted(map(str, set(d) - set(PREPROCESS_KEYS)))
    if unknown:
        raise VitMqaError(f"unknown preprocess setting(s): {', '.join(unknown)}")
    missing = [k for k in ("mean", "std") if k not in d]
    if missing:
        raise VitMqaError(f"\"preprocess\" has no {', '.join(missing)}")
    for key in ("mean", "std"):
        values = d[key]
        if not (isinstance(values, (list, tuple)) and len(values) == in_channels and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values)):
            raise VitMqaError(f"preprocess.{key} must be {in_channels} finite number(s), "
                              f"got {values!r}"[:200])
    if not all(v > 0 for v in d["std"]):
        raise VitMqaError(f"preprocess.std must be > 0, got {list(d['std'])!r}")
    resize, procedure = d.get("resize", "stretch"), d.get("procedure", "stretch")
    if resize not in RESIZES:
        raise VitMqaError(f"unknown preprocess.resize {resize!r}: use one of "
                          f"{', '.join(RESIZES)}")
    if procedure not in PROCEDURES:
        raise VitMqaError(f"unknown preprocessing procedure {procedure!r}: use one of "
                          f"{', '.join(PROCEDURES)}")
    return {"mean": [float(v) for v in d["mean"]], "std": [float(v) for v in d["std"]],
            "resize": resize, "procedure": procedure}


def check_data(c: Any) -> None:
    """The checks of a DataConfig: one line per problem."""
    check_field_types(c, "data")
    count = c.val_size is not None and c.val_size >= 1
    if c.val_size is not None and not (
            0 < c.val_size < 1 or (count and float(c.val_size).is_integer())):
        raise VitMqaError(f"val_size must be a count of images (>= 1) or a fraction "
                          f"between 0 and 1, got {c.val_size}")
    if c.split_seed < 0:
        raise VitMqaError(f"split_seed must be >= 0, got {c.split_seed}")
    if c.in_channels not in (None, 1, 3):
        raise VitMqaError(f"in_channels must be 1 or 3, got {c.in_channels}")
    if c.image_size is not None and not 1 <= c.image_size <= MAX_IMAGE_SIDE:
        raise VitMqaError(f"image_size must be 1 to {MAX_IMAGE_SIDE}, got {c.image_size}")
    if c.resize not in RESIZES:
        raise VitMqaError(f"unknown resize {c.resize!r}: use one of {', '.join(RESIZES)}")
    if not 0 <= c.printed <= 1:
        raise VitMqaError(f"printed must be a share of the training images in [0, 1], "
                          f"got {c.printed}")
    if not 0 <= c.num_outliers <= 1_000_000:
        raise VitMqaError(f"num_outliers must be 0 to 1000000, got {c.num_outliers}")
    if c.outliers and not all(part.strip() for part in c.outliers.split(",")):
        raise VitMqaError(f"outliers {c.outliers!r} names an empty source; separate "
                          "\"generated\" and folders with single commas")
    if c.printed and c.dataset != "mnist":
        raise VitMqaError(f"printed digits are for MNIST; dataset {c.dataset!r} "
                          "needs `printed` 0")


def check_augment(c: Any) -> None:
    """The checks of a AugmentConfig: one line per problem."""
    check_field_types(c, "augment")
    if not (0 <= c.rotate <= 360 and 0 <= c.translate <= 1):
        raise VitMqaError(f"need rotate in [0, 360] degrees and translate in [0, 1], got "
                          f"{c.rotate}, {c.translate}")
    if not (0 <= c.hflip <= 1 and 0 <= c.erase <= 1):
        raise VitMqaError(f"hflip and erase are probabilities in [0, 1], got "
                          f"{c.hflip}, {c.erase}")
    if not 0 < c.erase_min_area <= c.erase_max_area <= 1 or c.erase_ratio < 1:
        raise VitMqaError(
            f"need 0 < erase_min_area <= erase_max_area <= 1 and erase_ratio >= 1, got "
            f"{c.erase_min_area}, {c.erase_max_area}, {c.erase_ratio}")
    if not (0 <= c.mixup <= 100 and 0 <= c.cutmix <= 100
            and 0 <= c.mix_prob <= 1):
        raise VitMqaError(f"need mixup and cutmix in [0, 100] (Beta parameters; 0 = off) "
                          f"and mix_prob in [0, 1], got {c.mixup}, {c.cutmix}, "
                          f"{c.mix_prob}")
    if not (0 <= c.slant <= 60 and 1 <= c.aspect <= 4 and 0 <= c.elastic <= 10
            and 0 <= c.stroke <= 4 and 0 <= c.blur <= 4):
        raise VitMqaError(
            f"need slant in [0, 60] degrees, aspect in [1, 4], elastic in [0, 10] px, "
            f"stroke in [0, 4] px and blur in [0, 4] px, got {c.slant}, {c.aspect}, "
            f"{c.elastic}, {c.stroke}, {c.blur}")
    if not (0 <= c.lowres <= 1 and 0 <= c.contrast <= 1):
        raise VitMqaError(f"lowres and contrast are probabilities in [0, 1], got "
                          f"{c.lowres}, {c.contrast}")
    if not 0 < c.scale_min <= c.scale_max <= 100:
        raise VitMqaError(
            f"need 0 < scale_min <= scale_max, got {c.scale_min}, {c.scale_max}"
        )


def check_train(c: Any) -> None:
    """The checks of a TrainConfig: one line per problem."""
    check_field_types(c, "train")
    positive = ("epochs", "batch_size", "eval_batch_size")
    for name in positive:
        if getattr(c, name) < 1:
            raise VitMqaError(f"{name} must be >= 1, got {getattr(c, name)}")
    if c.lr <= 0 or c.min_lr < 0 or c.min_lr > c.lr:
        raise VitMqaError(f"need 0 <= min_lr <= lr and lr > 0, got {c.min_lr}, {c.lr}")
    if c.lr > 10:
        raise VitMqaError(f"lr {c.lr} is far outside any useful range (at most 10)")
    if not 0 <= c.beta2 < 1:
        raise VitMqaError(f"beta2 must be in [0, 1), got {c.beta2}")
    if not 0 <= c.seed < 2**63:
        raise VitMqaError(f"seed must be in [0, 2**63), got {c.seed}")
    if c.epochs > 100_000 or c.warmup_epochs > 100_000:
        raise VitMqaError(f"epochs and warmup_epochs must be <= 100000, got "
                          f"{c.epochs}, {c.warmup_epochs}")
    if not 0 <= c.label_smoothing < 1:
        raise VitMqaError(f"label_smoothing must be in [0, 1), got {c.label_smoothing}")
    if c.warmup_epochs < 0 or c.weight_decay < 0 or c.grad_clip < 0:
        raise VitMqaError("warmup_epochs, weight_decay and grad_clip must be >= 0")
    if c.max_steps < 0:
        raise VitMqaError(f"max_steps must be >= 0, got {c.max_steps}")
    if not 0 <= c.ema_decay < 1:
        raise VitMqaError(f"ema_decay must be in [0, 1), got {c.ema_decay}")
    if not 0 <= c.time_budget <= 10**7:
        raise VitMqaError(f"time_budget must be 0 (off) to 10000000 seconds, got "
                          f"{c.time_budget}")
    _check_choice("train", "select", c.select)
    if not 0 < c.layer_decay <= 1:
        raise VitMqaError(f"layer_decay must be in (0, 1], got {c.layer_decay}")
    _check_choice("train", "init_normalization", c.init_normalization)
    _check_choice("train", "distill", c.distill)
    if not (0 <= c.outlier_weight <= 10 and 0 < c.outlier_batch <= 4):
        raise VitMqaError(f"need outlier_weight in [0, 10] and outlier_batch in (0, 4], got "
                          f"{c.outlier_weight}, {c.outlier_batch}")
    if not (0 <= c.decline_unknown < 0.5 and 0 <= c.decline_unsure < 0.5):
        raise VitMqaError(f"decline_unknown and decline_unsure are shares in [0, 0.5), got "
                          f"{c.decline_unknown}, {c.decline_unsure}")
    if not 0 <= c.distill_weight <= 1:
        raise VitMqaError(f"distill_weight must be in [0, 1], got {c.distill_weight}")
    if not 0.1 <= c.distill_temperature <= 100:
        raise VitMqaError(f"distill_temperature must be in [0.1, 100], got "
                          f"{c.distill_temperature}")
    if c.teacher and not all(name.strip() for name in c.teacher.split(",")):
        raise VitMqaError(f"teacher {c.teacher!r} names an empty model; separate several "
                          "with single commas")


def checked_setting(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` if it fits the declared type of setting ``name`` of config dataclass
    ``cls``, else a one-line error naming ``where`` it came from. This is the one type
    check of a setting: the dataclasses run it on every field when made, and the recipe on
    every layer it merges. Ints are accepted (and returned as floats) for float settings;
    bools are never numbers; numbers must be finite (NaN passes every ``<`` / ``>`` range
    check, so it is refused here). Settings of other types (``image_size``: an int or
    [h, w]; the model's ``classes`` and ``preprocess``) are checked by their section."""
    declared = str(next(f.type for f in dataclasses.fields(cls) if f.name == name))
    if value is None and "None" in declared:
        return None
    kinds = [part.strip() for part in declared.split("|") if part.strip() != "None"]
    base = kinds[0] if len(kinds) == 1 else declared
    if base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise VitMqaError(f"{where}.{name} must be a finite number, got {value}")
        value = float(value) if ok else value
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "bool":
        ok = isinstance(value, bool)
    elif base == "str":
        ok = isinstance(value, str)
    else:
        return value
    if not ok:
        raise VitMqaError(f"{where}.{name} must be {declared}, got {value!r}")
    return value


def check_field_types(config: object, section: str) -> None:
    """Every field of a config dataclass passes ``checked_setting``; ``section`` names the
    config in the message (e.g. "model")."""
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        checked_setting(type(config), f.name, getattr(config, f.name), section)


def dataclass_from_dict(cls: type, d: object, what: str) -> Any:
    """``cls(**d)`` for a config section read from JSON, with one clear error when ``d`` is
    not an object or names a setting ``cls`` does not have."""
    import dataclasses

    if not isinstance(d, dict):
        raise VitMqaError(f"{what} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(d) - known))
    if unknown:
        raise VitMqaError(f"unknown {what} setting(s): {', '.join(unknown)}")
    return cls(**d)


# The temperatures calibration may fit, and a config.json may hold.
TEMPERATURE_RANGE = (0.01, 100.0)
