"""A small PyTorch MAE-ST (pre-training and fine-tuned classifier) in mae_st's state-dict layout, for parity tests."""

import re

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, t_patch, patch):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(t_patch, patch, patch), stride=(t_patch, patch, patch))

    def forward(self, x):  # [N, C, T, H, W] -> [N, T'*H'*W', E], time-major tokens
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        n, length, dim = x.shape
        split = lambda y: y.reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)  # [N, h, L, hd]
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = ((q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _pos_params(module, prefix, dim, grid, sep, cls):
    t, h, w = grid
    zeros = lambda n: nn.Parameter(torch.zeros(1, n, dim))
    if sep:
        setattr(module, prefix + "pos_embed_spatial", zeros(h * w))
        setattr(module, prefix + "pos_embed_temporal", zeros(t))
        if cls:
            setattr(module, prefix + "pos_embed_class", zeros(1))
    else:
        setattr(module, prefix + "pos_embed", zeros(t * h * w + int(cls)))


def _pos_table(module, prefix, grid, sep, cls):
    """[1, (1 +) L, dim]: the cls position first when there is a cls token."""
    t, h, w = grid
    if not sep:
        return getattr(module, prefix + "pos_embed")
    spatial, temporal = getattr(module, prefix + "pos_embed_spatial"), getattr(module, prefix + "pos_embed_temporal")
    pos = spatial.repeat(1, t, 1) + torch.repeat_interleave(temporal, h * w, dim=1)
    return torch.cat([getattr(module, prefix + "pos_embed_class"), pos], 1) if cls else pos


class Encoder(nn.Module):
    def __init__(self, img_size=32, patch_size=16, num_frames=8, t_patch_size=2, in_chans=3, embed_dim=768,
                 depth=2, num_heads=12, sep_pos_embed=True, cls_embed=True):
        super().__init__()
        self.grid = (num_frames // t_patch_size, img_size // patch_size, img_size // patch_size)
        self.sep, self.cls = sep_pos_embed, cls_embed
        self.patch_embed = PatchEmbed(in_chans, embed_dim, t_patch_size, patch_size)
        if cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        _pos_params(self, "", embed_dim, self.grid, sep_pos_embed, cls_embed)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)


class MaskedAutoencoder(Encoder):
    """mae_st MaskedAutoencoderViT; forward(imgs [N, 3, T, H, W], noise [N, L]) -> (loss, pred, mask).

    pyslowfast=True: PySlowFast's MaskMViT decoder instead (no decoder cls token: the encoder's class-token
    output goes through decoder_embed; one joint decoder pos table [1, 1 + L, D]; the target is every
    T/pred_t_dim-th frame); `to_pyslowfast_mae` gives its state dict names."""

    def __init__(self, decoder_embed_dim=512, decoder_depth=2, decoder_num_heads=16, pred_t_dim=4,
                 norm_pix_loss=True, pyslowfast=False, **kwargs):
        super().__init__(**kwargs)
        self.pyslowfast = pyslowfast
        e, d = kwargs.get("embed_dim", 768), decoder_embed_dim
        p, t = kwargs.get("patch_size", 16), kwargs.get("t_patch_size", 2)
        self.pred_t_dim, self.norm_pix_loss = pred_t_dim, norm_pix_loss
        self.u = t * pred_t_dim // kwargs.get("num_frames", 8)
        self.p = p
        self.decoder_embed = nn.Linear(e, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        if self.cls and not pyslowfast:
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, d))
        _pos_params(self, "decoder_", d, self.grid, self.sep and not pyslowfast, self.cls)
        self.decoder_blocks = nn.ModuleList(Block(d, decoder_num_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, self.u * p * p * kwargs.get("in_chans", 3))

    def forward_encoder(self, imgs, noise, mask_ratio):
        x = self.patch_embed(imgs)
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        gather = lambda y: torch.gather(y, 1, ids_keep.unsqueeze(-1).repeat(1, 1, y.shape[-1]))
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        pos = _pos_table(self, "", self.grid, self.sep, self.cls).expand(n, -1, -1)
        x = gather(x)
        if self.cls:
            x = torch.cat([self.cls_token.expand(n, -1, -1), x], 1)
            pos = torch.cat([pos[:, :1], gather(pos[:, 1:])], 1)
        else:
            pos = gather(pos)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.pyslowfast:  # the decoder gets the class-token output too
            return x, mask, ids_restore
        return (x[:, 1:] if self.cls else x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        n, length = ids_restore.shape
        x = self.decoder_embed(x)
        cls = None
        if self.cls:
            cls = x[:, :1] if self.pyslowfast else self.decoder_cls_token.expand(n, -1, -1)
            x = x[:, 1:] if self.pyslowfast else x
        x = torch.cat([x, self.mask_token.repeat(n, length - x.shape[1], 1)], 1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[-1]))  # unshuffle
        if self.cls:
            x = torch.cat([cls, x], 1)
        x = x + _pos_table(self, "decoder_", self.grid, self.sep and not self.pyslowfast, self.cls)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:] if self.cls else x

    def patchify(self, imgs):  # [N, 3, T, H, W] -> [N, L, u*p*p*3], vector ordered (u, row, col, channel)
        n, c, t, h, w = imgs.shape
        u, p = self.u, self.p
        x = imgs.reshape(n, c, t // u, u, h // p, p, w // p, p)
        x = torch.einsum("nctuhpwq->nthwupqc", x)
        return x.reshape(n, (t // u) * (h // p) * (w // p), u * p * p * c)

    def forward_loss(self, imgs, pred, mask):
        frames = torch.linspace(0, imgs.shape[2] - 1, self.pred_t_dim).long()  # truncated, as mae_st
        if self.pyslowfast:  # every other frame for T=16, pred_t_dim=8
            frames = torch.arange(0, imgs.shape[2], imgs.shape[2] // self.pred_t_dim)
        target = self.patchify(torch.index_select(imgs, 2, frames))
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, noise, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, noise, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


class VisionTransformer(Encoder):
    """mae_st models_vit classifier: all tokens, blocks, mean over patch tokens, norm, head."""

    def __init__(self, num_classes=10, **kwargs):
        super().__init__(**kwargs)
        self.head = nn.Linear(kwargs.get("embed_dim", 768), num_classes)

    def forward(self, imgs):
        x = self.patch_embed(imgs)
        if self.cls:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + _pos_table(self, "", self.grid, self.sep, self.cls)
        for blk in self.blocks:
            x = blk(x)
        x = (x[:, 1:] if self.cls else x).mean(1)  # mae_st drops token 0 even without cls; we do not
        return self.head(self.norm(x))


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make every parameter random (LayerNorm scales near 1, tokens/pos/biases small)."""
    gen = torch.Generator().manual_seed(seed)
    for name, prm in model.named_parameters():
        noise = torch.randn(prm.shape, generator=gen)
        if "norm" in name and name.endswith("weight"):
            prm.copy_(1.0 + 0.1 * noise)
        elif prm.ndim <= 1 or "token" in name or "pos_embed" in name:
            prm.copy_(0.02 * noise)
        else:  # Linear / Conv3d: keep the default fan-in scale
            prm.copy_(noise * prm.std())
    return model


def to_pyslowfast_mae(state_dict: dict, decoder_depth: int, cfg: str = "MASK:\n  MAE_ON: True\n") -> dict:
    """PySlowFast MaskMViT names of a pyslowfast=True MaskedAutoencoder's state dict: fused attn.qkv; the
    decoder blocks and norm in pred_head.transforms.0, decoder_pred as pred_head.projections.0."""
    out = {}
    for key, value in to_pyslowfast(state_dict)["model_state"].items():
        key = re.sub(r"^decoder_blocks\.", "pred_head.transforms.0.", key)
        key = re.sub(r"^decoder_norm\.", f"pred_head.transforms.0.{decoder_depth}.", key)
        out[re.sub(r"^decoder_pred\.", "pred_head.projections.0.", key)] = value
    return {"model_state": out, "epoch": 3, "cfg": cfg}


def to_pyslowfast(state_dict: dict) -> dict:
    """PySlowFast layout of a mae_st state dict: fused attn.qkv, head.projection, under 'model_state'."""
    out = {}
    for key, value in state_dict.items():
        if ".attn.q." in key:
            base, leaf = key.split(".attn.q.")
            out[f"{base}.attn.qkv.{leaf}"] = torch.cat(
                [state_dict[f"{base}.attn.{n}.{leaf}"] for n in "qkv"], 0)
        elif ".attn.k." in key or ".attn.v." in key:
            continue
        else:
            out[key.replace("head.", "head.projection.", 1) if key.startswith("head.") else key] = value
    return {"model_state": out, "epoch": 3, "cfg": "TRAIN:\n  ENABLE: True\n"}
