"""What the kernel tests read from a program lowered for CUDA on the CPU."""

import re


def triton_operand_shapes(text):
    """The tensor shapes of every Triton custom call's operands and results."""
    shapes = set()
    for line in text.splitlines():
        if "__gpu$xla.gpu.triton" in line:
            shapes.update(re.findall(r"tensor<([0-9x]+)x(?:bf16|f32|i32)>", line))
    return shapes
