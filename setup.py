"""Only lists the Cython extensions; all metadata is in pyproject.toml."""
import pysam
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    # shared building blocks, cimported by the kernels below: output staging
    # (_io.pxd), the BGZF block reader (_bgzf.pxd), the BAM record layer (_records.pxd)
    Extension("bamflow.kernels._io", ["bamflow/kernels/_io.pyx"]),
    Extension("bamflow.kernels._bgzf", ["bamflow/kernels/_bgzf.pyx"]),
    Extension("bamflow.kernels._records", ["bamflow/kernels/_records.pyx"]),
    Extension("bamflow.kernels.lines", ["bamflow/kernels/lines.pyx"]),
    Extension("bamflow.kernels.bam", ["bamflow/kernels/bam.pyx"]),
    Extension("bamflow.kernels.select", ["bamflow/kernels/select.pyx"]),
    Extension("bamflow.kernels.presets", ["bamflow/kernels/presets.pyx"]),
    Extension("bamflow.kernels.umi", ["bamflow/kernels/umi.pyx"]),
    Extension("bamflow.kernels.record", ["bamflow/kernels/record.pyx"]),
    # reads pysam's records in place (its bam1_t): pysam's headers, no linking
    Extension(
        "bamflow.kernels.pysam_bridge",
        ["bamflow/kernels/pysam_bridge.pyx"],
        include_dirs=pysam.get_include(),
        define_macros=pysam.get_defines(),
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
