"""What each ``model.arch`` means for loading, training and previews."""

from __future__ import annotations

from dataclasses import dataclass

TURBO_REPO = "Tongyi-MAI/Z-Image-Turbo"


@dataclass(frozen=True)
class Arch:
    name: str
    label: str
    default_model: str
    shift: float  # scheduler shift, also used by the ``shift`` / ``lognorm`` timestep types
    sample_steps: int  # transformer forwards for previews
    sample_guidance: float  # classic CFG; <= 1 means none
    uses_adapter: bool  # the training adapter is applied while training, removed for previews
    parts_from: str | None = None  # where text encoder, tokenizer, VAE and scheduler come from if the repo lacks them


ARCHS = {
    a.name: a
    for a in (
        Arch("zimage_turbo_adapter", "Z-Image Turbo (w/ Training Adapter)", TURBO_REPO, 3.0, 8, 1.0, True),
        Arch("zimage_turbo", "Z-Image Turbo (raw, drifts)", TURBO_REPO, 3.0, 8, 1.0, False),
        Arch(
            "zimage_deturbo",
            "Z-Image De-Turbo (De-Distilled)",
            "ostris/Z-Image-De-Turbo",
            3.0,
            25,
            3.0,
            False,
            parts_from=TURBO_REPO,
        ),
        Arch("zimage_base", "Z-Image (Base)", "Tongyi-MAI/Z-Image", 6.0, 30, 4.0, False),
    )
}
