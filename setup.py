"""Build: setuptools drives CMake, the one build definition of the native tree walk."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        subprocess.run(
            [
                "cmake", str(ROOT),
                f"-DCMAKE_BUILD_TYPE={cfg}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            ],
            cwd=build_dir, check=True,
        )
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


setup(
    packages=find_packages(include=["ibtpo_fast", "ibtpo_fast.*"]) + ["ibtpo_fast.kernels"],
    package_dir={"ibtpo_fast.kernels": "kernels"},
    include_package_data=True,
    ext_modules=[CMakeExtension("ibtpo_fast._native")],
    cmdclass={"build_ext": CMakeBuild},
)
