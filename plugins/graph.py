"""What one forward's autograd graph shows that relevance hooks cannot see, and which module made each node.

The relevance hooks act on modules. A branch merge written as ``h + f(h)`` inside a module's ``forward``,
or an activation called as a function, leaves no module for a rule to act on. :func:`module_nodes` records,
during one forward, the nodes each module's own forward created; :func:`inspect_graph` walks the graph once
and names what the hooks would miss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import Node
from zennit.types import Activation

#: Autograd nodes of elementwise ops on two tensors. When both inputs depend on the model input (a residual
#: h + f(h), a gate h * g(h)) the relevance pass hands each branch the full relevance: not conserved.
MERGE_NODES = frozenset({"AddBackward0", "SubBackward0", "MulBackward0"})
#: Autograd nodes of elementwise activations, to find those called as functions rather than modules.
ACTIVATION_NODES = frozenset(
    {
        "ReluBackward0",
        "ThresholdBackward0",
        "LeakyReluBackward0",
        "PreluKernelBackward0",
        "RreluWithNoiseBackward0",
        "EluBackward0",
        "CeluBackward0",
        "GeluBackward0",
        "SiluBackward0",
        "MishBackward0",
        "SoftplusBackward0",
        "SigmoidBackward0",
        "LogSigmoidBackward0",
        "TanhBackward0",
        "HardtanhBackward0",
        "HardsigmoidBackward0",
        "HardswishBackward0",
    }
)


@dataclass
class ModuleNodes:
    """Autograd nodes by the module whose own forward created them, filled during one forward.

    ``activation``: the nodes of activation modules (what the hooks see). ``owner``: each node's innermost
    named module (the root's own nodes have none).
    """

    activation: set[Node] = field(default_factory=set)
    owner: dict[Node, str] = field(default_factory=dict)

    def describe(self, node: Node, model: nn.Module) -> str:
        """Where ``node`` was computed, for an error message: ``"features.2 (InvertedResidual)"``."""
        name = self.owner.get(node)
        if name is None:
            return f"the forward of the model itself ({type(model).__name__})"
        return f"{name} ({type(model.get_submodule(name)).__name__})"


@contextmanager
def module_nodes(model: nn.Module) -> Iterator[ModuleNodes]:
    """Record which module's forward created each autograd node of the forwards run in the block.

    The recording hooks run before any other forward hook, so they see the module's own output, which
    depends on its inputs only (a rule's replacement might not, and lead the walk out of the module). Inner
    modules finish first, so a node keeps its innermost owner. Hooks are removed on exit, even after an
    exception.
    """
    recorded = ModuleNodes()

    def recorder(name: str, is_activation: bool) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: object) -> None:
            if not isinstance(output, torch.Tensor) or output.grad_fn is None:
                return
            inputs = {
                arg.grad_fn for arg in args if isinstance(arg, torch.Tensor) and arg.grad_fn is not None
            }
            nodes = nodes_between(output.grad_fn, inputs)
            if is_activation:
                recorded.activation.update(nodes)
            if name:  # an identity or in-place module's output node is its input's: not its own
                for node in nodes - inputs:
                    recorded.owner.setdefault(node, name)

        return record

    handles = [
        module.register_forward_hook(recorder(name, isinstance(module, Activation)), prepend=True)
        for name, module in model.named_modules()
        if name
    ]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def nodes_between(output: Node, inputs: set[Node]) -> set[Node]:
    """``output`` and the nodes behind it down to, not including, the ``inputs`` nodes: one module's own
    nodes (Tanhshrink's x - tanh(x) has three). An in-place module's output node is its input's: just it."""
    found = {output}
    stack = [] if output in inputs else [child for child, _ in output.next_functions]
    while stack:
        node = stack.pop()
        if node is not None and node not in inputs and node not in found:
            found.add(node)
            stack.extend(child for child, _ in node.next_functions)
    return found


def graph_nodes(root: Node) -> list[Node]:
    """Every autograd node behind ``root``, each listed after all the nodes it leads to.

    Iterative depth-first search (a deep network would overflow Python's recursion limit). A node is marked
    when it is expanded, not when pushed, so one reached again deeper down is finished there first.
    """
    order: list[Node] = []
    expanded: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
        elif node not in expanded:
            expanded.add(node)
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions if child is not None)
    return order


@dataclass(frozen=True)
class GraphFindings:
    """What a forward's autograd graph holds that the relevance hooks cannot handle.

    ``merges``: elementwise Add/Sub/Mul nodes with two inputs that depend on the model input, outside an
    activation module. ``functional_activations``: names of activation nodes on the model input's path that
    no activation module produced.
    """

    merges: tuple[Node, ...]
    functional_activations: tuple[str, ...]


def inspect_graph(z: torch.Tensor, root: Node, activation_nodes: set[Node]) -> GraphFindings:
    """Find branch merges and functional activations between the leaf ``z`` and the output node ``root``.

    A bias addition or a constant factor does not merge branches (its other input is a parameter or no
    tensor), nor does a concatenation, through which LRP conserves relevance. ``activation_nodes`` are the
    nodes created inside activation modules (:attr:`ModuleNodes.activation`), which the hooks do see.
    """
    depends: dict[Node, bool] = {}
    merges: list[Node] = []
    activations: list[str] = []
    for node in graph_nodes(root):
        inputs = [depends[child] for child, _ in node.next_functions if child is not None]
        depends[node] = getattr(node, "variable", None) is z or any(inputs)
        if node in activation_nodes:
            continue
        if node.name() in MERGE_NODES and sum(inputs) >= 2:
            merges.append(node)
        elif node.name() in ACTIVATION_NODES and depends[node]:
            activations.append(node.name())
    return GraphFindings(tuple(merges), tuple(activations))
