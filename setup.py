from setuptools import find_packages, setup

# Only the ``spotlighter`` package is installed. The repository's ``trainers/`` and ``datasets/``
# folders are imported by ``train.py`` from the checkout (as in CoOp), never installed as top-level
# packages, so ``pip install -e .`` does not shadow HuggingFace ``datasets``.
setup(
    name="spotlighter",
    version="0.1.0",
    description="Spotlighter (EMNLP 2025 Findings) and CLIP prompt-tuning baselines as Dassl trainers",
    python_requires=">=3.10",
    packages=find_packages(include=["spotlighter", "spotlighter.*"]),
    package_data={"spotlighter": ["data/*.csv", "benchmark/reference/*"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy",
        "Pillow",
        "yacs",
        "filelock",
        "tqdm",  # check_data.py's progress bar; also imported by upstream Dassl
        # Not imported by this project: an import-time dependency of upstream Dassl
        # (dassl.engine.trainer), which the README installs with --no-deps.
        "tabulate",
        "ftfy",
        "regex",
        "clip-anytorch>=2.6",
        # clip-anytorch imports pkg_resources, which setuptools>=82 no longer ships.
        "setuptools<82",
    ],
    extras_require={
        "plot": ["matplotlib"],
        # OpenCLIP backbones (MODEL.BACKBONE.NAME openclip:<MODEL>:<TAG>, spotlighter/openclip.py):
        # open_clip and what this project imports of its dependencies directly. open-clip-torch
        # asks for torch>=2.0, so an installed torch is kept.
        "openclip": ["open-clip-torch>=3.0", "safetensors", "huggingface_hub"],
        "test": ["pytest>=7"],
    },
    entry_points={"console_scripts": ["spotlighter-results=spotlighter.results.cli:main"]},
)
