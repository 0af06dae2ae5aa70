"""model=gpt: a decoder-only transformer language model, GPT-2's design as nanoGPT trains it.

Token and position embeddings, ``n_layer`` pre-norm blocks (causal self-attention through
``scaled_dot_product_attention``, which is flash attention on GPUs, then a 4x MLP with GELU), a
final LayerNorm, and the output head tied to the token embedding: the logits are the final states
times the embedding matrix, so the model has one vocabulary matrix and no separate head module.
Initialisation as GPT-2: every weight normal with std 0.02, biases zero, and the two projections
that write into the residual stream scaled by 1/sqrt(2 n_layer), so that the stream's variance
does not grow with depth.

Dropout (``model.dropout``, 0 by default as nanoGPT pretrains) is torch's: on the embeddings' sum,
the attention weights and each block's two residual outputs. Its masks come from each rank's own
torch RNG, which checkpoints keep: a run resumes bitwise at the same world size, but with dropout
it is not the same run at another world size (README, Language models).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distsgd.config import ModelConfig

INIT_STD = 0.02


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.residual_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # (3, N, heads, T, head size): queries, keys and values of every head in one matmul.
        q, k, v = self.qkv(x).view(n, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                       is_causal=True)
        return self.residual_dropout(self.proj(y.transpose(1, 2).reshape(n, t, d)))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, attention dropout={self.dropout}"


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attention = SelfAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def residual_projections(self) -> list[torch.Tensor]:
        return [self.attention.proj.weight, self.mlp[2].weight]


class GPT(nn.Module):
    """Token ids (N, T), T <= block_size, to next-token logits (N, T, vocab_size)."""

    def __init__(self, cfg: ModelConfig, block_size: int, vocab_size: int) -> None:
        super().__init__()
        self.block_size, self.n_layer, self.n_embd = block_size, cfg.n_layer, cfg.n_embd
        self.token = nn.Embedding(vocab_size, cfg.n_embd)
        self.position = nn.Embedding(block_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for weight in block.residual_projections():
                nn.init.normal_(weight, std=INIT_STD / math.sqrt(2 * cfg.n_layer))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output (N, T, n_embd)."""
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.dropout(self.token(x) + self.position(positions))
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.token.weight)  # the head tied to the token embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(x))

    def num_params(self) -> int:
        """Parameters without the position embedding, as nanoGPT's get_num_params counts them: the
        token embedding stays in, since it is also the head's matrix."""
        return sum(p.numel() for p in self.parameters()) - self.position.weight.numel()

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward): 6N for the weights' matmuls plus
        12 L T d for attention's scores and weighted sums (PaLM's appendix B, nanoGPT's estimate_mfu)."""
        return 6 * self.num_params() + 12 * self.n_layer * self.block_size * self.n_embd

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperatures: list[float],
                 generator: torch.Generator) -> torch.Tensor:
        """``prompt`` (1, P) continued by ``new_tokens`` tokens once per temperature (0: greedy),
        each row seeing at most the last block_size tokens; draws only from ``generator``."""
        was_training = self.training
        self.eval()
        tokens = prompt.repeat(len(temperatures), 1)
        temperature = torch.tensor(temperatures, device=prompt.device).unsqueeze(1)
        greedy = temperature == 0
        for _ in range(new_tokens):
            logits = self.logits(self.hidden(tokens[:, -self.block_size:])[:, -1]).float()
            probs = torch.softmax(logits / temperature.masked_fill(greedy, 1.0), dim=-1)
            drawn = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, torch.where(greedy, logits.argmax(-1, keepdim=True), drawn)], dim=1)
        self.train(was_training)
        return tokens
