"""The one packaging fact pyproject.toml cannot say: configs/ (at the repository root, the house layout) is
installed as the package ``lmzoo.configs``, YAML files included, so every install finds the shipped configs
(``lmzoo.configs.path``); the harness task files and the chat page ship as package data too. pyproject's
``packages.find`` cannot rename a folder, hence this file; everything else is in pyproject.toml.
"""

from setuptools import find_namespace_packages, find_packages, setup

# the family folders are packages too (data-only), or setuptools warns that it would skip them
configs = ["lmzoo.configs"] + [f"lmzoo.configs.{p}" for p in find_namespace_packages(where="configs")]
setup(packages=find_packages(include=["lmzoo*"]) + configs, package_dir={"lmzoo.configs": "configs"},
      # the lm-evaluation-harness tasks lmzoo ships (their YAML and JSON-lines data) and the chat page
      package_data={**{p: ["*.yaml"] for p in configs}, "lmzoo.eval.harness_tasks": ["*.yaml", "*.jsonl"],
                    "lmzoo.serve": ["static/*.html"]})
