"""Effort's orthogonal-subspace tuning (Yan et al., "Orthogonal Subspace Decomposition for Generalizable
AI-Generated Image Detection", ICML 2025), as its released code trains CLIP ViT-L/14:

- each linear layer of the backbone's self-attention (a timm ViT's ``attn.qkv`` and ``attn.proj``; a fused
  ``qkv`` is taken as its three ``q``, ``k``, ``v`` matrices, as CLIP's separate projections are) is split
  by its SVD ``W = U S V^T`` into the principal part, the top ``n - k`` singular triplets (``n`` the
  smaller side), kept frozen, and the residual, the last ``k`` triplets, whose ``U``, ``S`` and ``V``
  train (initialised from the SVD, so the layer starts as the pretrained one); the paper's ViT-L uses
  ``k = 1`` of 1024;
- every other backbone weight (MLPs, norms, embeddings) stays frozen; the new head trains;
- the loss is the training's own (the released code trains with cross-entropy only; the paper's
  orthogonality and singular-value constraints, not enabled in that code, are not added here).

Saved, each layer is one plain weight again (principal + trained residual): a plain timm expert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SVDResidualLinear(nn.Module):
    """A linear layer as ``W_main + U_res diag(S_res) V_res`` per row block (one block, or ``q``/``k``/``v``
    of a fused ``qkv``): ``W_main`` (the top singular triplets) frozen, ``U_res``, ``S_res``, ``V_res`` (the
    last ``rank``) trained."""

    def __init__(self, linear: nn.Linear, rank: int, blocks: int = 1):
        super().__init__()
        weight = linear.weight.detach()
        if weight.shape[0] % blocks:
            raise ValueError(f"{weight.shape[0]} output rows do not split into {blocks} blocks")
        rows = weight.shape[0] // blocks
        mains, us, ss, vs = [], [], [], []
        for block in weight.float().split(rows, dim=0):
            u, s, vh = torch.linalg.svd(block, full_matrices=False)
            keep = max(0, len(s) - rank)  # the principal subspace: all but the last `rank` triplets
            mains.append(u[:, :keep] @ torch.diag(s[:keep]) @ vh[:keep])
            us.append(u[:, keep:])
            ss.append(s[keep:])
            vs.append(vh[keep:])
        self.in_features, self.out_features, self.blocks = linear.in_features, linear.out_features, blocks
        self.weight_main = nn.Parameter(torch.cat(mains).to(weight.dtype), requires_grad=False)
        self.U_residual = nn.Parameter(torch.stack(us).to(weight.dtype))  # (blocks, rows, k)
        self.S_residual = nn.Parameter(torch.stack(ss).to(weight.dtype))  # (blocks, k)
        self.V_residual = nn.Parameter(torch.stack(vs).to(weight.dtype))  # (blocks, k, in)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The layer's current weight (some attention modules read ``qkv.weight`` directly)."""
        residual = self.U_residual @ (self.S_residual.unsqueeze(-1) * self.V_residual)  # (blocks, rows, in)
        return self.weight_main + residual.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def merged(self) -> nn.Linear:
        """The plain linear layer of the current weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight_main.device, dtype=self.weight_main.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def attention_linears(net: nn.Module) -> list[tuple[str, nn.Linear, int]]:
    """The linear layers of the backbone's self-attention modules (a module named ``attn``: not an attention
    pooling head), each with its number of row blocks (3 for a fused ``qkv``)."""
    found = []
    for name, module in net.named_modules():
        parent, _, child = name.rpartition(".")
        if isinstance(module, nn.Linear) and parent.rpartition(".")[2] == "attn":
            fused = child == "qkv" and module.out_features == 3 * module.in_features
            found.append((name, module, 3 if fused else 1))
    return found


def add_effort(net: nn.Module, rank: int) -> int:
    """Replace :func:`attention_linears` of ``net`` by :class:`SVDResidualLinear` of residual rank ``rank``,
    in place (only the residuals require gradients). Returns how many layers were replaced."""
    layers = attention_linears(net)
    for name, linear, blocks in layers:
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, SVDResidualLinear(linear, rank, blocks))
    return len(layers)
