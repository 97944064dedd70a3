"""Candidate mirrors of a module nobody declared, for `symrun check --discover`.

A layer's units are the output axis of a weight (…weight, shape (units, …)) together with its
bias (…bias, (units,)), paired with the input axis (axis 1) of the next parameter that has
`units` inputs — the next layer's weight. For each such group: a sign flip of each unit (a
mirror when the activation between them is odd: tanh, not ReLU) and a swap of each pair of
units (when the layers treat units alike); and for two adjacent matrices, a rotation of their
product's inner space (when nothing but a linear map sits between them). Which of these hold is
for `symrun check` to find out: a candidate is only a guess until the loss is measured.
"""

from __future__ import annotations

from symrun.analysis.symmetries import NeuronSet, Rotation, SignFlip, Slot, Swap, Symmetry


def candidates(shapes: dict[str, tuple[int, ...]]) -> list[Symmetry]:
    """Sign flips, swaps and rotations to try, from the per-run parameter shapes (in the order
    the module registers its parameters)."""
    names = list(shapes)
    out: list[Symmetry] = []
    for i, name in enumerate(names):
        shape = shapes[name]
        if len(shape) < 2 or not name.endswith("weight"):
            continue
        units, prefix = shape[0], name[: -len("weight")]
        following = [n for n in names[i + 1:] if len(shapes[n]) >= 2 and shapes[n][1] == units]
        if not following:
            continue                                   # the output layer: its units are the outputs
        slots = [Slot(name, 1)]
        if shapes.get(prefix + "bias") == (units,):
            slots.append(Slot(prefix + "bias", 1))
        slots.append(Slot(following[0], 2))
        group = NeuronSet(prefix.rstrip(".") or name, tuple(slots), lead=1)
        out += [SignFlip(group), Swap(group)]
        if len(shape) == 2 and len(shapes[following[0]]) == 2:
            out.append(Rotation(following[0], name))
    return out


def as_declaration(sym: Symmetry) -> dict:
    """A mirror as the user declares it in model.mirrors (axes without the run axis)."""
    if isinstance(sym, Rotation):
        return {"kind": "rotation", "left": sym.left, "right": sym.right}
    kind = "rescaling" if isinstance(sym, SignFlip) else "permutation"
    return {"kind": kind, "name": sym.neurons.name, "slots": [[s.param, s.axis - sym.neurons.lead] for s in sym.neurons.slots]}


def same_mirror(a: Symmetry, b: Symmetry) -> bool:
    """Whether two specs declare the same mirrors, whatever their groups are named."""
    if isinstance(a, Rotation) or isinstance(b, Rotation):
        return a == b
    return type(a) is type(b) and a.neurons.slots == b.neurons.slots and a.neurons.lead == b.neurons.lead
