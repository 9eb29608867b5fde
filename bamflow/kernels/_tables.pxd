# The one copy of each lookup table of the BAM format that the kernels share
# (SAM specification section 4.2), and the one 2-bit packing of a barcode:
#
# - AUX_FIXED: bytes of an aux value by its type byte (A c C s S i I f fixed;
#   0 for Z H B, whose size is measured; -1 not a type);
# - SEQ_NT16 / SEQ_LETTERS: htslib's seq_nt16_table ("=ACMGRSVTWYHKDBN" in either
#   case, and 0 1 2 3 U as htslib reads them; anything else N) and its inverse;
# - BASE2 / pack2: A C G T -> 0 1 2 3 (anything else 255), and a barcode or UMI
#   of at most 32 bases packed into a uint64_t, first base in the high bits so
#   that codes sort as the strings do.
#
# Header-only (static const tables compiled into each module): cimported by
# _records.pyx (the aux walker), record.pyx (Record edits), presets.pyx (FASTQ
# to BAM, whitelists, barcode correction) and umi.pyx (UMI clustering).

from libc.stdint cimport uint8_t, uint64_t


cdef extern from *:
    """
    /* [first ... last] ranges: a GCC and Clang extension (the compilers bamflow builds with) */
    static const unsigned char BAMFLOW_BASE2[256] __attribute__((unused)) = {
        [0 ... 255] = 255, ['A'] = 0, ['C'] = 1, ['G'] = 2, ['T'] = 3,
    };
    static const unsigned char BAMFLOW_SEQ_NT16[256] __attribute__((unused)) = {
        [0 ... 255] = 15,
        ['='] = 0, ['A'] = 1, ['a'] = 1, ['C'] = 2, ['c'] = 2, ['M'] = 3, ['m'] = 3, ['G'] = 4,
        ['g'] = 4, ['R'] = 5, ['r'] = 5, ['S'] = 6, ['s'] = 6, ['V'] = 7, ['v'] = 7, ['T'] = 8,
        ['t'] = 8, ['W'] = 9, ['w'] = 9, ['Y'] = 10, ['y'] = 10, ['H'] = 11, ['h'] = 11, ['K'] = 12,
        ['k'] = 12, ['D'] = 13, ['d'] = 13, ['B'] = 14, ['b'] = 14, ['N'] = 15, ['n'] = 15,
        ['0'] = 1, ['1'] = 2, ['2'] = 4, ['3'] = 8, ['U'] = 8, ['u'] = 8,
    };
    static const char BAMFLOW_SEQ_LETTERS[17] __attribute__((unused)) = "=ACMGRSVTWYHKDBN";
    static const signed char BAMFLOW_AUX_FIXED[256] __attribute__((unused)) = {
        [0 ... 255] = -1, ['A'] = 1, ['c'] = 1, ['C'] = 1, ['s'] = 2, ['S'] = 2, ['i'] = 4, ['I'] = 4, ['f'] = 4,
        ['Z'] = 0, ['H'] = 0, ['B'] = 0,
    };
    """
    const uint8_t BASE2 "BAMFLOW_BASE2"[256]
    const uint8_t SEQ_NT16 "BAMFLOW_SEQ_NT16"[256]
    const char SEQ_LETTERS "BAMFLOW_SEQ_LETTERS"[17]
    const signed char AUX_FIXED "BAMFLOW_AUX_FIXED"[256]


cdef inline bint pack2(const uint8_t *s, Py_ssize_t n, uint64_t *code) noexcept nogil:
    """Set code to the 2-bit code of s[:n]; False (code untouched) when n > 32 or a base is not ACGT."""
    cdef uint64_t c = 0
    cdef Py_ssize_t i
    cdef uint8_t b
    if n > 32:
        return False
    for i in range(n):
        b = BASE2[s[i]]
        if b == 255:
            return False
        c = (c << 2) | b
    code[0] = c
    return True
