from setuptools import find_packages, setup

# teacher.quantize; ModelOpt imports requests without declaring it
MODELOPT = ["nvidia-modelopt[torch]>=0.33", "requests"]

setup(
    name="megatron-gndpo",
    version="0.1.0",
    description="On-policy distillation (GNDPO) on megatron-core: TP/PP/DP student and teacher, "
    "vocab-parallel log-ratios, HF <-> Megatron conversion.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_gndpo", "megatron_gndpo.*"]),
    install_requires=[
        "torch>=2.6",
        # 0.16.1 is the newest for Python 3.11; 0.17+ (Python 3.12) is supported too
        "megatron-core>=0.16.1",
        "pyarrow>=14",
        "safetensors>=0.4",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "rich>=13",
        # megatron-core's dist_checkpointing imports it without declaring it
        "psutil>=5.9",
        "numpy",
        "einops",
    ],
    entry_points={"console_scripts": ["megatron-gndpo=megatron_gndpo.cli:main"]},
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.4", "vllm>=0.10", *MODELOPT],
        "quant": MODELOPT,
        "wandb": ["wandb"],
        "math": ["mathruler>=0.1", "pylatexenc>=2.10", "sympy"],
        "dev": ["pytest>=8", "ruff>=0.6", "matplotlib>=3.8", "mathruler>=0.1", "pylatexenc>=2.10", "sympy", *MODELOPT],
    },
)
