"""Builds the optional native CPU loss kernel with CMakeLists.txt during `pip install` (editable or not).

Everything else is in pyproject.toml. The build never fails the install: without cmake or a C++ compiler,
fastlm runs the PyTorch path of the same computation and says so (fastlm.model.cpu_kernels).
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name))
        try:
            built = self._cmake(ext.name.rpartition(".")[2])
        except (OSError, subprocess.CalledProcessError, FileNotFoundError) as error:
            print(f"fastlm: the native CPU loss kernel was not built ({error}); the PyTorch path will run instead",
                  file=sys.stderr)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)

    @staticmethod
    def _cmake(name: str) -> Path:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise FileNotFoundError("cmake not found")
        build = Path(tempfile.mkdtemp(prefix="fastlm-cmake-"))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        f"-DPython3_EXECUTABLE={sys.executable}"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([cmake, "--build", str(build), "--target", name, "-j", "2"], check=True,
                       stdout=subprocess.DEVNULL)
        return next(build.glob(f"{name}*.so"))


setup(ext_modules=[Extension("fastlm.kernels._cpu_xent", sources=[])], cmdclass={"build_ext": CMakeBuild})
