"""Knowledge distillation: a trained teacher whose predictions a model also learns from.

The teacher (one model or several, averaged) sees every augmented, mixed batch the
student sees, as in DeiT (Touvron et al. 2021) and "consistent teaching" (Beyer et al.
2022): its targets follow the augmentation, so they stay right for a rotated, blurred or
CutMix-ed image where a label or a teacher's view of the clean image would not. The loss
is ``(1 - w) * loss on the labels + w * loss on the teacher``, the teacher's part either
soft (Hinton et al. 2015: KL divergence between the two softmaxes at a temperature T,
times T squared) or hard (cross-entropy with the teacher's top class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.sections import TrainConfig
from ..data.preprocess import Preprocess
from ..errors import VitMqaError
from ..models.vit import VisionTransformer


class Teacher(nn.Module):
    """Frozen models that answer for a batch normalised the student's way: each input is
    brought to a teacher's own normalisation first, and the answers are averaged as
    probabilities (returned as log-probabilities)."""

    def __init__(self, models: list[VisionTransformer], student: Preprocess) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t, per channel.
        self.scales, self.shifts = [], []
        for m in models:
            mean_s, std_s = torch.tensor(student.mean), torch.tensor(student.std)
            mean_t, std_t = torch.tensor(m.preprocess.mean), torch.tensor(m.preprocess.std)
            self.scales.append((std_s / std_t)[:, None, None])
            self.shifts.append(((mean_s - mean_t) / std_t)[:, None, None])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:  # always answers in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [F.softmax(m(x * scale.to(x) + shift.to(x)).float(), dim=1)
                 for m, scale, shift in zip(self.models, self.scales, self.shifts)]
        return torch.stack(probs).mean(dim=0).clamp_min(1e-12).log()


def load_teacher(names: str, student: Preprocess, classes: list[str],
                 device: torch.device) -> Teacher:
    """The teacher a config names (comma-separated model folders, runs or built-in
    names), checked against the student's input and classes."""
    models = []
    for name in (n.strip() for n in names.split(",")):
        model = VisionTransformer.from_pretrained(name)
        where = f"teacher {name}"
        if (tuple(model.config.image_size) != tuple(student.image_size)
                or model.config.in_channels != student.in_channels):
            raise VitMqaError(f"{where} takes {model.config.in_channels}x"
                              f"{model.config.image_size[0]}x{model.config.image_size[1]} "
                              f"images, but this run's are {student.in_channels}x"
                              f"{student.image_size[0]}x{student.image_size[1]}")
        if list(model.classes) != list(classes):
            raise VitMqaError(f"{where} names other classes ({len(model.classes)}: "
                              f"{', '.join(map(str, model.classes[:4]))}...) than this run's "
                              f"data ({len(classes)}); a teacher must know the same classes")
        models.append(model.to(device))
    return Teacher(models, student)


def distillation_loss(logits: torch.Tensor, label_loss: torch.Tensor,
                      teacher_log_probs: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The label loss blended with the loss on the teacher's answer, per ``cfg``."""
    if cfg.distill == "hard":
        taught = F.cross_entropy(logits, teacher_log_probs.argmax(dim=1))
    else:
        t = cfg.distill_temperature
        taught = F.kl_div(F.log_softmax(logits / t, dim=1),
                          F.log_softmax(teacher_log_probs / t, dim=1),
                          reduction="batchmean", log_target=True) * (t * t)
    return torch.lerp(label_loss, taught, cfg.distill_weight)
