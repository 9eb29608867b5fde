"""Only lists the Cython extensions; all metadata is in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    # shared building blocks, cimported by the kernels below (see _records.pxd)
    Extension("bamflow.kernels._records", ["bamflow/kernels/_records.pyx"]),
    Extension("bamflow.kernels.lines", ["bamflow/kernels/lines.pyx"]),
    Extension("bamflow.kernels.bam", ["bamflow/kernels/bam.pyx"]),
    Extension("bamflow.kernels.select", ["bamflow/kernels/select.pyx"]),
    Extension("bamflow.kernels.presets", ["bamflow/kernels/presets.pyx"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
