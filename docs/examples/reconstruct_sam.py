"""mrfifo's BAM_reconstruct example on SAM text, run by bamflow.

    python docs/examples/reconstruct_sam.py test_data/tiny.sam [out.sam]

reader → distribute (header to its own FIFO) → 4 pass-through workers →
collect (header first, round-robin so the order is kept) → file.
Prints what each job returned and checks the output equals the input.
"""

import sys
import time

import bamflow as bf


def pass_through(input, output):
    i = 0
    for line in input:
        i += 1
        output.write(line)
    return i


def is_header(line):
    return line.startswith("@")


def main(path: str, out: str, n: int = 4, chunk_size: int = 1) -> None:
    started = time.monotonic()
    w = (
        bf.Workflow("SAM_reconstruct")
        .reader(input=path, output=bf.FIFO("input_sam", "wb"))
        .distribute(
            input=bf.FIFO("input_sam", "rt"),
            outputs=bf.FIFO("dist{n}", "wt", n=n),
            chunk_size=chunk_size,
            header_detect_func=is_header,
            header_broadcast=False,
            header_fifo=bf.FIFO("header", "wt"),
        )
        .workers(
            input=bf.FIFO("dist{n}", "rt"),
            output=bf.FIFO("out{n}", "wt"),
            func=pass_through,
            n=n,
        )
        .collect(
            inputs=bf.FIFO("out{n}", "rt", n=n),
            header_fifo=bf.FIFO("header", "rt"),
            output=bf.FIFO("out_sam", "wt"),
            chunk_size=chunk_size,
            order="round-robin",
        )
        .funnel(
            input=bf.FIFO("out_sam", "rt"),
            output=out,
            _manage_fifos=False,
            func=bf.parts.write_file,
        )
        .run()
    )
    elapsed = time.monotonic() - started
    for name, result in w.result_dict.items():
        print(f"{name:28} {result}")
    with open(path, "rb") as a, open(out, "rb") as b:
        same = a.read() == b.read()
    print(f"records through the workers: {w.reduce()}; output identical to input: {same}; {elapsed:.2f} s")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "reconstruct.sam")
