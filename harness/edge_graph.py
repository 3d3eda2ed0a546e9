"""A model's computational graph as edges, without torch: which nodes send, which receive, and
which edges exist (a sender upstream of a receiver).

Senders are the embeddings (`embed`), every query head's output (`L0H1`) and every MLP's output
(`mlp0`); receivers are every head's q, k and v input (`L1H2:q`; on a grouped-query model k and
v belong to key/value heads, `L1KV0:k`), every MLP's input (`mlp1`) and the logits. An edge runs
from u to v iff u writes the residual stream before v reads it: a head reads everything before
its layer; a sequential block's MLP also reads its own layer's heads; a parallel block's MLP
(GPT-NeoX/Pythia, Phi) reads the block's input, as its heads do; the logits read everything.
Attention-only models have no MLP nodes.

Indices: senders and receivers are numbered in graph order (`EdgeGraph.senders`,
`.receivers`): embed, then per layer its heads and its MLP; per layer the q inputs of its query
heads, the k inputs of its key/value heads, their v inputs, its MLP; the logits last. A dense
edge-weight tensor is indexed [sender, receiver] in that order (`measure/edge_forward.py`).
Labels are parsed and formatted by `labels.py`'s edge grammar.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from harness import labels
from harness.errors import safe_text
from harness.labels import EdgeLabel, Head, HeadInput, LabelError, LayerPart

SENDER_KINDS = ("embed", "head", "mlp")
RECEIVER_KINDS = ("q", "k", "v", "mlp", "logits")


class EdgeError(ValueError):
    """An edge label that is malformed or names an edge the model does not have."""


@dataclass(frozen=True)
class Node:
    """A sender (kind embed / head / mlp) or a receiver (kind q / k / v / mlp / logits).
    `head` is the query head (head, q) or the key/value head (k, v); `kv`: k/v inputs of a
    grouped-query model, written `L1KV0:k` (else `L1H0:k`)."""

    kind: str
    layer: int = 0
    head: int = 0
    kv: bool = False

    @property
    def label(self) -> str:
        if self.kind in ("embed", "logits"):
            return self.kind
        if self.kind == "mlp":
            return f"mlp{self.layer}"
        head = Head(self.layer, self.head, self.kv)
        return str(head) if self.kind == "head" else str(HeadInput(head, self.kind))

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Edge:
    sender: Node
    receiver: Node

    @property
    def label(self) -> str:
        return f"{self.sender.label} -> {self.receiver.label}"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class EdgeGraph:
    """The nodes and edges of one model shape (see the module docstring for the order)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False     # attention and MLP of a layer both read resid_pre
    has_mlp: bool = True       # False: attention-only

    @classmethod
    def of(cls, cfg) -> EdgeGraph:
        """From a TransformerLens config (a bridge's `cfg`)."""
        n_heads = int(cfg.n_heads)
        return cls(n_layers=int(cfg.n_layers), n_heads=n_heads,
                   n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or n_heads),
                   parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
                   has_mlp=not getattr(cfg, "attn_only", False))

    @property
    def grouped(self) -> bool:
        return self.n_kv_heads != self.n_heads

    # ---- nodes ----------------------------------------------------------------------------
    @cached_property
    def senders(self) -> tuple[Node, ...]:
        out = [Node("embed")]
        for layer in range(self.n_layers):
            out += [Node("head", layer, h) for h in range(self.n_heads)]
            if self.has_mlp:
                out.append(Node("mlp", layer))
        return tuple(out)

    @cached_property
    def receivers(self) -> tuple[Node, ...]:
        out = []
        for layer in range(self.n_layers):
            out += [Node("q", layer, h) for h in range(self.n_heads)]
            for kind in ("k", "v"):
                out += [Node(kind, layer, h, self.grouped) for h in range(self.n_kv_heads)]
            if self.has_mlp:
                out.append(Node("mlp", layer))
        return (*out, Node("logits", self.n_layers))

    @cached_property
    def sender_index(self) -> dict[Node, int]:
        return {n: i for i, n in enumerate(self.senders)}

    @cached_property
    def receiver_index(self) -> dict[Node, int]:
        return {n: i for i, n in enumerate(self.receivers)}

    def layer_senders(self, layer: int) -> tuple[range, range | None]:
        """Sender indices of a layer's heads and of its MLP (None without MLPs)."""
        per = self.n_heads + self.has_mlp
        start = 1 + layer * per
        return range(start, start + self.n_heads), \
            (range(start + self.n_heads, start + per) if self.has_mlp else None)

    def layer_receivers(self, layer: int) -> dict[str, range]:
        """Receiver indices of a layer's q, k, v inputs and MLP ("mlp" absent without MLPs)."""
        per = self.n_heads + 2 * self.n_kv_heads + self.has_mlp
        start = layer * per
        q = range(start, start + self.n_heads)
        k = range(q.stop, q.stop + self.n_kv_heads)
        v = range(k.stop, k.stop + self.n_kv_heads)
        out = {"q": q, "k": k, "v": v}
        if self.has_mlp:
            out["mlp"] = range(v.stop, v.stop + 1)
        return out

    # ---- which senders each receiver reads ------------------------------------------------
    def _sender_stage(self, node: Node) -> int:
        """When a sender writes: 0 embed, 2l+1 layer l's heads, 2l+2 its MLP."""
        return {"embed": 0, "head": 2 * node.layer + 1}.get(node.kind, 2 * node.layer + 2)

    def _receiver_stage(self, node: Node) -> int:
        """The last stage a receiver reads (senders of stages up to it)."""
        if node.kind == "logits":
            return 2 * self.n_layers
        if node.kind == "mlp" and not self.parallel:
            return 2 * node.layer + 1
        return 2 * node.layer

    def upstream(self, sender: Node, receiver: Node) -> bool:
        return self._sender_stage(sender) <= self._receiver_stage(receiver)

    def n_upstream(self, receiver: Node) -> int:
        """How many senders a receiver reads: they are the first n in sender order."""
        stage = self._receiver_stage(receiver)
        if stage == 0:
            return 1
        layer, mlp_too = (stage - 1) // 2, stage % 2 == 0   # last layer read, its MLP too?
        heads, mlp = self.layer_senders(layer)
        return mlp.stop if (mlp_too and mlp is not None) else heads.stop

    @cached_property
    def edges(self) -> tuple[Edge, ...]:
        return tuple(Edge(self.senders[s], r) for r in self.receivers
                     for s in range(self.n_upstream(r)))

    # ---- labels ---------------------------------------------------------------------------
    def node_of(self, end) -> Node:
        """A parsed sender or receiver label -> its node (range not checked here)."""
        if end in ("embed", "logits"):
            return Node(end, self.n_layers if end == "logits" else 0)
        if isinstance(end, LayerPart):
            return Node("mlp", end.layer)
        if isinstance(end, Head):
            return Node("head", end.layer, end.head)
        assert isinstance(end, HeadInput)
        kv = end.input != "q" and self.grouped
        return Node(end.input, end.head.layer, end.head.head, kv)

    def edge(self, text: str) -> Edge:
        """The edge a label names in this graph; EdgeError says why it is not one."""
        try:
            parsed = labels.parse_edge(text)
        except LabelError as exc:
            raise EdgeError(str(exc)) from None
        problem = edge_problem(parsed, self)
        if problem:
            raise EdgeError(f"{safe_text(repr(text))}: {problem}")
        return Edge(self.node_of(parsed.sender), self.node_of(parsed.receiver))


def order_problem(edge: EdgeLabel, parallel: bool | None = None) -> str | None:
    """Why a sender cannot reach a receiver by layer order alone (None: it can, or only the
    model's block shape can tell: `parallel` None leaves same-layer head -> MLP open)."""
    s, r = edge.sender, edge.receiver
    if s == "embed" or r == "logits":
        return None
    s_layer = s.layer
    if isinstance(r, HeadInput):
        if s_layer < r.head.layer:
            return None
        return (f"{labels.format_edge_end(s)} (layer {s_layer}) writes after "
                f"{r} (layer {r.head.layer}) reads: a head input reads only earlier layers")
    if isinstance(s, Head) and s_layer == r.layer:   # a layer's heads -> its own MLP
        if parallel:
            return (f"on this model attention and MLP of a layer both read the block's input "
                    f"(parallel block), so {s} does not reach mlp{r.layer}")
        return None
    if s_layer < r.layer:
        return None
    return (f"{labels.format_edge_end(s)} (layer {s_layer}) writes after mlp{r.layer} "
            f"(layer {r.layer}) reads")


def edge_problem(edge: EdgeLabel, graph: EdgeGraph) -> str | None:
    """Why a parsed edge is not an edge of `graph` (ranges, grouped-query heads, order)."""
    for end in (edge.sender, edge.receiver):
        if end in ("embed", "logits"):
            continue
        layer = end.head.layer if isinstance(end, HeadInput) else end.layer
        if not 0 <= layer < graph.n_layers:
            return f"layer {layer} is out of range: the model has {graph.n_layers} layers"
        if isinstance(end, LayerPart) and not graph.has_mlp:
            return f"{end}: this model is attention-only; it has no MLP layers"
        head = end.head if isinstance(end, HeadInput) else end if isinstance(end, Head) else None
        if head is None:
            continue
        # (L1KV2:k names L1H2:k where every query head has its own key/value head)
        if isinstance(end, HeadInput) and end.input != "q" and graph.grouped and not head.kv:
            if head.head >= graph.n_heads:
                return f"head {head.head} is out of range: the model has {graph.n_heads} heads"
            group = head.head * graph.n_kv_heads // graph.n_heads
            return (f"on this model k and v belong to {graph.n_kv_heads} key/value heads "
                    f"per layer: write L{head.layer}KV{group}:{end.input} (query head "
                    f"{head.head} reads key/value head {group})")
        size = graph.n_kv_heads if head.kv else graph.n_heads
        if not 0 <= head.head < size:
            what = "key/value heads" if head.kv else "heads"
            return f"head {head.head} is out of range: the model has {size} {what} per layer"
    return order_problem(edge, graph.parallel)


def edges_of(cfg) -> tuple[Edge, ...]:
    """Every edge of a model (a TransformerLens config), receivers in graph order."""
    return EdgeGraph.of(cfg).edges
