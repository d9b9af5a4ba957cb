"""The one build step pyproject.toml cannot say: a wheel carries the BPF sources and the schema inside
the package (``app/_data/bpf/``, ``app/_data/init.sql``), where app/resources.py finds them.
Everything else (metadata, package discovery) is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA_FILES = ["init.sql", "bpf/*.c", "bpf/*.h"]


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return      # an editable install reads the checkout's own files in place
        target = Path(self.build_lib) / "app" / "_data"
        for pattern in DATA_FILES:
            sources = sorted(ROOT.glob(pattern))
            if not sources:
                raise SystemExit(f"setup.py: {pattern} matches nothing in {ROOT}: the wheel would be incomplete")
            for source in sources:
                dest = target / source.relative_to(ROOT)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest)


setup(cmdclass={"build_py": BuildPyWithData})
