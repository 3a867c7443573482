from setuptools import find_packages, setup

setup(
    name="domainbed_sil",
    version="0.1.0",
    description="DomainBed-style harness for Score Invariant Learning (SIL), IRM, V-REx and ERM",
    packages=find_packages(include=["domainbed_sil", "domainbed_sil.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0,<=2.14.1",
        "torchvision>=0.15,<=0.29.1",
        "numpy",
        "pandas",
        "tabulate",
        "submitit",
        "tqdm",
        "matplotlib",
        "Pillow",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
)
