"""Writes test_data/tiny.sam: a small SAM text file (header with a UTF-8
comment, 10x-style tags) used by the README example. Deterministic."""

import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def main(path=os.path.join(HERE, "tiny.sam"), n_reads=600, seed=7):
    rng = random.Random(seed)
    barcodes = ["".join(rng.choice("ACGT") for _ in range(16)) for _ in range(12)]
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("@HD\tVN:1.6\tSO:unsorted\n")
        f.write("@SQ\tSN:chr1\tLN:248956422\n")
        f.write("@RG\tID:tiny\tSM:tiny\n")
        f.write("@CO\tsmall example for bamflow — grüße\n")
        for i in range(n_reads):
            seq = "".join(rng.choice("ACGT") for _ in range(50))
            qual = "".join(chr(33 + rng.randrange(2, 41)) for _ in range(50))
            cb = rng.choice(barcodes)
            umi = "".join(rng.choice("ACGT") for _ in range(12))
            f.write(
                f"read{i}\t0\tchr1\t{rng.randrange(1, 10**6)}\t255\t50M\t*\t0\t0\t{seq}\t{qual}\t"
                f"CB:Z:{cb}-1\tUB:Z:{umi}\tRG:Z:tiny\n"
            )


if __name__ == "__main__":
    main()
