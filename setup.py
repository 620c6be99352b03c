"""Build glue (``python -m build``; the metadata is in pyproject.toml).

``bgsession.py`` and ``appdelegate.py`` stay single files in the repository: that is how they are copied into
projects. Installed, each becomes a package, ``bgsession/__init__.py`` (the same file) beside a ``py.typed``
marker, because PEP 561 has no marker for a lone module: a user's mypy and pyright then read the annotations. The
daemon re-executes its own ``__file__``, which is then ``bgsession/__init__.py``: that works the same.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

#: The single-file modules installed as typed packages.
MODULES = ("bgsession", "appdelegate")
#: bgsession/__main__.py: the command line of ``python -m bgsession``.
MAIN = "import sys\n\nfrom bgsession import _main\n\nsys.exit(_main())\n"


class build_py_typed(build_py):
    """build_py that lays each single-file module out as a package with a py.typed marker."""

    def run(self) -> None:
        super().run()
        for name in MODULES:
            package = os.path.join(self.build_lib, name)
            self.mkpath(package)
            self.copy_file(f"{name}.py", os.path.join(package, "__init__.py"))
            with open(os.path.join(package, "py.typed"), "w", encoding="ascii"):
                pass  # the marker is empty: its presence is the message
        with open(os.path.join(self.build_lib, "bgsession", "__main__.py"), "w", encoding="ascii") as main:
            main.write(MAIN)  # `python -m bgsession`, as with the single file

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        made = [os.path.join(self.build_lib, name, f) for name in MODULES for f in ("__init__.py", "py.typed")]
        return outputs + made + [os.path.join(self.build_lib, "bgsession", "__main__.py")]


class _Distribution(Distribution):
    """No package or module is declared (build_py_typed makes them), yet there are pure modules to build."""

    def has_pure_modules(self) -> bool:
        return True


setup(distclass=_Distribution, cmdclass={"build_py": build_py_typed})
