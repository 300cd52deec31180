"""Differentiate a network-traffic LP with the QP layer: which link capacities limit throughput?

The problem (Chiu 2021, §8): a graph with link capacities c_e, demands d_k between
source–target pairs k, and for each pair a few candidate paths (the shortest simple paths,
`networkx.shortest_simple_paths`). Route flow x_p ≥ 0 on every path to maximize the total
throughput

    max_x  1ᵀx   s.t.   Σ_{p ∋ e} x_p ≤ c_e  (every link e),   Σ_{p ∈ k} x_p ≤ d_k  (every pair k).

This LP's solution sits at a vertex of the polytope: there dx/dc is zero or undefined, and it
jumps when the optimal vertex changes. Adding a small ridge (ε/2)‖x‖² (`qp_solve(...,
ridge=ε)`) makes the solution unique (the least-norm point of the optimal face as ε → 0),
piecewise linear in c and differentiable almost everywhere, at a throughput cost of at most
(ε/2)‖x_LP‖². The layer's backward then gives

- dT/dc_e: the sensitivity of the throughput to every capacity (the LP's shadow prices as
  ε → 0); edges with dT/dc_e > 0 are the bottlenecks;
- dx_p/dc_e: how every path's flow reacts to every capacity;

both checked here against central finite differences. Figures: the graph with links colored by
dT/dc_e, and T versus one bottleneck's capacity with the gradient's tangent line.

Usage::

    python examples/network_traffic.py              # Abilene backbone + random graphs
    python examples/network_traffic.py --smoke      # seconds, for tests
    python examples/network_traffic.py --out figs/  # where figures go (default out/network_traffic)
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import torch

from structift.layers import qp_solve

F64 = torch.float64

# The Abilene (Internet2) research backbone, ~2004: 11 points of presence and 14 links, with
# approximate (longitude, latitude) for drawing.
ABILENE_NODES = {
    "Seattle": (-122.3, 47.6),
    "Sunnyvale": (-122.0, 37.4),
    "Los Angeles": (-118.2, 34.1),
    "Denver": (-105.0, 39.7),
    "Kansas City": (-94.6, 39.1),
    "Houston": (-95.4, 29.8),
    "Chicago": (-87.6, 41.9),
    "Indianapolis": (-86.2, 39.8),
    "Atlanta": (-84.4, 33.7),
    "Washington": (-77.0, 38.9),
    "New York": (-74.0, 40.7),
}
ABILENE_LINKS = [
    ("Seattle", "Sunnyvale"),
    ("Seattle", "Denver"),
    ("Sunnyvale", "Los Angeles"),
    ("Sunnyvale", "Denver"),
    ("Los Angeles", "Houston"),
    ("Denver", "Kansas City"),
    ("Kansas City", "Houston"),
    ("Kansas City", "Indianapolis"),
    ("Houston", "Atlanta"),
    ("Indianapolis", "Chicago"),
    ("Indianapolis", "Atlanta"),
    ("Chicago", "New York"),
    ("Atlanta", "Washington"),
    ("Washington", "New York"),
]


@dataclass
class Network:
    """A routing instance: graph, links, pairs, candidate paths and their incidence."""

    name: str
    graph: nx.Graph
    edges: list[tuple[str, str]]
    pairs: list[tuple[str, str]]
    paths: list[list[str]]
    path_pair: list[int]  # pair index of every path
    R: torch.Tensor  # [E, P] link-path incidence
    D: torch.Tensor  # [K, P] pair-path incidence
    capacity: torch.Tensor  # [E]
    demand: torch.Tensor  # [K]


def build_network(
    name: str, graph: nx.Graph, n_pairs: int, k_paths: int, gen: torch.Generator
) -> Network:
    """Pick random source–target pairs, their k shortest simple paths, capacities and demands."""
    nodes = sorted(graph.nodes, key=str)
    edges = [tuple(sorted(e, key=str)) for e in graph.edges]
    edge_index = {e: i for i, e in enumerate(edges)}
    all_pairs = list(itertools.combinations(nodes, 2))
    order = torch.randperm(len(all_pairs), generator=gen)[:n_pairs].tolist()
    pairs = [all_pairs[i] for i in order]
    paths, path_pair = [], []
    for k, (s, t) in enumerate(pairs):
        for path in itertools.islice(nx.shortest_simple_paths(graph, s, t), k_paths):
            paths.append(path)
            path_pair.append(k)
    R = torch.zeros(len(edges), len(paths), dtype=F64)
    D = torch.zeros(len(pairs), len(paths), dtype=F64)
    for j, path in enumerate(paths):
        for u, v in itertools.pairwise(path):
            R[edge_index[tuple(sorted((u, v), key=str))], j] = 1.0
        D[path_pair[j], j] = 1.0
    capacity = 5.0 + 10.0 * torch.rand(len(edges), generator=gen, dtype=F64)
    demand = 6.0 + 12.0 * torch.rand(len(pairs), generator=gen, dtype=F64)
    return Network(name, graph, edges, pairs, paths, path_pair, R, D, capacity, demand)


def route(net: Network, capacity: torch.Tensor, ridge: float) -> torch.Tensor:
    """Return the regularized max-throughput path flows x [..., P] for capacities [..., E].

    Solves min −1ᵀx + (ε/2)‖x‖² s.t. Rx ≤ c, Dx ≤ d, −x ≤ 0 (ε = ridge); differentiable in c.
    """
    P = net.R.shape[1]
    G = torch.cat([net.R, net.D, -torch.eye(P, dtype=F64)])
    rest = torch.cat([net.demand, torch.zeros(P, dtype=F64)])
    h = torch.cat([capacity, rest.expand(*capacity.shape[:-1], -1)], dim=-1)
    Q = torch.zeros(P, P, dtype=F64)
    return qp_solve(Q, -torch.ones(P, dtype=F64), G, h, ridge=ridge)


def sensitivities(net: Network, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return flows x [P], dT/dc [E] and the Jacobian dx/dc [P, E] through the QP backward."""
    c = net.capacity.clone().requires_grad_()
    x = route(net, c, ridge)
    (dT,) = torch.autograd.grad(x.sum(), c, retain_graph=True)
    rows = [torch.autograd.grad(x[j], c, retain_graph=True)[0] for j in range(x.shape[0])]
    return x.detach(), dT, torch.stack(rows)


def finite_differences(net: Network, ridge: float, step: float) -> torch.Tensor:
    """Return the central-difference Jacobian dx/dc [P, E] (two solves per capacity, batched)."""
    E = net.capacity.shape[0]
    eye = torch.eye(E, dtype=F64)
    plus = route(net, net.capacity + step * eye, ridge)  # batch of E perturbed networks
    minus = route(net, net.capacity - step * eye, ridge)
    return ((plus - minus) / (2 * step)).T


def lp_gap_bound(x: torch.Tensor, ridge: float) -> float:
    """The regularized optimum loses at most (ε/2)‖x_LP‖² ≤ (ε/2)·(throughput bound)² of T."""
    return 0.5 * ridge * float(x.sum()) ** 2


def analyze(net: Network, ridge: float, step: float, verbose: bool = True) -> dict[str, object]:
    """Solve, differentiate, check against finite differences and report the bottlenecks."""
    x, dT, J = sensitivities(net, ridge)
    J_fd = finite_differences(net, ridge, step)
    err = float((J - J_fd).abs().max())
    err_T = float((dT - J_fd.sum(0)).abs().max())
    bottlenecks = [net.edges[i] for i in (dT > 0.5).nonzero().reshape(-1).tolist()]
    if verbose:
        print(
            f"\n== {net.name}: {net.graph.number_of_nodes()} nodes, {len(net.edges)} links, "
            f"{len(net.pairs)} pairs, {len(net.paths)} paths, ridge ε = {ridge:g}"
        )
        t_lp = float(route(net, net.capacity, 1e-7).sum())
        print(
            f"throughput T = {float(x.sum()):.4f}; with ε = 1e-7 (≈ the LP) {t_lp:.4f}; "
            f"bias bound (ε/2)·T² = {lp_gap_bound(x, ridge):.2g}"
        )
        print(f"check dx/dc: max |backward − finite differences| = {err:.2e}; dT/dc: {err_T:.2e}")
        order = dT.argsort(descending=True).tolist()
        print("links by dT/dc (capacity → throughput per unit):")
        for i in order[:6]:
            u, v = net.edges[i]
            print(
                f"  {u} – {v}: dT/dc = {float(dT[i]):+.3f} (capacity {float(net.capacity[i]):.2f})"
            )
        names = ", ".join(f"{u}–{v}" for u, v in bottlenecks) or "none (demand-limited)"
        print(f"bottleneck links: {names}")
        e = order[0]
        moved = J[:, e].abs().argsort(descending=True)[:3].tolist()
        u, v = net.edges[e]
        print(f"path flows most sensitive to the capacity of {u}–{v}:")
        for j in moved:
            route_str = "→".join(net.paths[j])
            print(f"  dx/dc = {float(J[j, e]):+.3f}  x = {float(x[j]):.3f}  path {route_str}")
    return {"x": x, "dT": dT, "J": J, "err": err, "err_T": err_T, "bottlenecks": bottlenecks}


def draw_graph(net: Network, dT: torch.Tensor, x: torch.Tensor, path: Path) -> None:
    """Draw the network, links colored by dT/dc and widened by their load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = nx.get_node_attributes(net.graph, "pos") or nx.spring_layout(net.graph, seed=0)
    load = net.R @ x
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    cmap = plt.get_cmap("viridis")
    vmax = max(float(dT.max()), 1e-9)
    nx.draw_networkx_nodes(net.graph, pos, ax=ax, node_size=60, node_color="black")
    nx.draw_networkx_labels(net.graph, pos, ax=ax, font_size=7, verticalalignment="bottom")
    nx.draw_networkx_edges(
        net.graph,
        pos,
        ax=ax,
        edgelist=net.edges,
        edge_color=[cmap(float(v) / vmax) for v in dT],
        width=[1.0 + 4.0 * float(lo / c) for lo, c in zip(load, net.capacity)],
    )
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, vmax))
    fig.colorbar(sm, ax=ax, label="dT / dc_e  (throughput per unit capacity)")
    ax.set_title(f"{net.name}: link sensitivity (width = utilization)")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_tangent(
    net: Network, edge: int, dT: torch.Tensor, ridge: float, path: Path, points: int
) -> float:
    """Plot T(c_e) over a range of one capacity with the gradient's tangent; return max gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c0 = float(net.capacity[edge])
    grid = torch.linspace(0.0, 4.0 * c0, points, dtype=F64)
    caps = net.capacity.expand(points, -1).clone()
    caps[:, edge] = grid
    T = route(net, caps, ridge).sum(-1)  # one batched solve for the whole sweep
    T0 = float(route(net, net.capacity, ridge).sum())
    slope = float(dT[edge])
    tangent = T0 + slope * (grid - c0)
    near = (grid - c0).abs() <= 0.05 * c0
    gap = float((T[near] - tangent[near]).abs().max()) if bool(near.any()) else 0.0
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(grid, T, label="throughput T(c_e) (QP solves)")
    ax.plot(grid, tangent, "--", label=f"tangent, slope dT/dc_e = {slope:.3f} (backward)")
    ax.plot([c0], [T0], "o", color="black")
    u, v = net.edges[edge]
    ax.set_xlabel(f"capacity of {u}–{v}")
    ax.set_ylabel("total throughput")
    ax.set_title(f"{net.name}: throughput vs one bottleneck capacity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return gap


def abilene() -> nx.Graph:
    g = nx.Graph()
    for name, pos in ABILENE_NODES.items():
        g.add_node(name, pos=pos)
    g.add_edges_from(ABILENE_LINKS)
    return g


def random_graph(n: int, seed: int) -> nx.Graph:
    g = nx.connected_watts_strogatz_graph(n, 4, 0.3, seed=seed)
    return nx.relabel_nodes(g, {i: f"v{i}" for i in g.nodes})


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="small and fast (for tests)")
    ap.add_argument("--out", type=Path, default=Path("out/network_traffic"))
    ap.add_argument("--ridge", type=float, default=1e-3, help="ε of the (ε/2)‖x‖² regularizer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    step = 1e-4  # T and x are piecewise linear-quadratic in c: a larger step loses nothing

    nets = [
        build_network("Abilene", abilene(), n_pairs=8 if args.smoke else 12, k_paths=3, gen=gen)
    ]
    for i, n in enumerate([12] if args.smoke else [16, 24, 32]):
        nets.append(
            build_network(
                f"random graph {i} (n={n})", random_graph(n, args.seed + i), n // 2, 3, gen
            )
        )
    results = [analyze(net, args.ridge, step) for net in nets]
    worst = max(max(float(r["err"]), float(r["err_T"])) for r in results)

    main_net, main_res = nets[0], results[0]
    draw_graph(main_net, main_res["dT"], main_res["x"], args.out / "abilene_sensitivity.png")  # type: ignore[arg-type]
    dT = main_res["dT"]
    assert isinstance(dT, torch.Tensor)
    edge = int(dT.argmax())
    gap = plot_tangent(
        main_net, edge, dT, args.ridge, args.out / "abilene_tangent.png", 25 if args.smoke else 121
    )
    for i, (net, res) in enumerate(zip(nets[1:], results[1:])):
        draw_graph(net, res["dT"], res["x"], args.out / f"random_{i}_sensitivity.png")  # type: ignore[arg-type]

    # Degeneracy: with a tiny ridge the gradient approaches the LP's shadow prices; with ε = 0
    # the layer refuses (Q singular) instead of returning a silent zero gradient.
    tiny = sensitivities(main_net, 1e-6)[1]
    gap_lp = float((dT - tiny).abs().max())
    print(f"\nLP limit: max |dT/dc(ε={args.ridge:g}) − dT/dc(ε=1e-6)| = {gap_lp:.2e}")
    try:
        route(main_net, main_net.capacity, 0.0)
    except ValueError as e:
        print(f"ε = 0 (pure LP) is refused: {str(e)[:90]}...")
    print(f"tangent check: |T(c) − tangent| within ±5% of c_e: {gap:.2e}")
    print(f"figures in {args.out}/")
    tol = 1e-6
    status = "passed" if worst <= tol else "FAILED"
    print(f"finite-difference checks {status}: worst error {worst:.2e} (tolerance {tol:g})")
    if worst > tol:
        raise SystemExit(1)
    return {"nets": nets, "results": results, "worst": worst}


if __name__ == "__main__":
    main()
