"""Build script. Package metadata lives in pyproject.toml; this file exists so that the CUDA C++
extension (csrc/, a later milestone) can be added to the build without changing how users install."""

from setuptools import setup

setup()
