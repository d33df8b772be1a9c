"""A Hugging Face Space (Gradio SDK) running the DI* demo app: copy this folder into a Space repository.

The model comes from the Space's variables: ``DI_STAR_MODEL`` (default ``XDG-XHS/distar_long_1step``) and, for the
before/after tab, ``DI_STAR_COMPARE_MODEL``; ``DI_STAR_VARIANT`` (default ``fp16``; empty for none) and
``DI_STAR_SIZE``. Locally: ``python examples/space/app.py`` (or ``di-star serve``).
"""

import os

from diffusers_di_star.demo_ui import build_app

demo = build_app(
    os.environ.get("DI_STAR_MODEL", "XDG-XHS/distar_long_1step"),
    compare_model=os.environ.get("DI_STAR_COMPARE_MODEL"),
    size=int(os.environ.get("DI_STAR_SIZE", "1024")),
    variant=os.environ.get("DI_STAR_VARIANT", "fp16") or None,  # the released checkpoints' fp16 weight files
)

if __name__ == "__main__":
    demo.launch()
