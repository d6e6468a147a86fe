"""Tiny random-weight diffusers pipelines, built entirely offline.

``python -m serve_app.tiny build --out .models/tiny [--only KEY ...]`` writes,
for each model key, ``<out>/<key>/``: a ``save_pretrained`` directory of the
REAL diffusers pipeline class for that key (``HunyuanVideoPipeline``,
``WanPipeline``, ``WanImageToVideoPipeline`` for ``wan-i2v`` and ``wan-ati``,
``Lumina2Pipeline`` for ``newbie-image``, ``QwenImagePipeline``,
``QwenImageEditPipeline``), loadable with ``DiffusionPipeline.from_pretrained``.
Configs, tokenizer vocabularies and weights are all created in code from a
fixed seed per key; nothing is downloaded.

Each directory also holds ``genguard_tiny.json`` (key, class, seed, default
size, builder version). It is written last, inside a temporary directory that
is then renamed into place, so a directory with a manifest is complete and an
interrupted build leaves only a ``.tmp-*`` directory behind; rebuilding a
complete directory is a no-op.

Tokenizers and prompt templates
-------------------------------
Three pipelines wrap the user's prompt in a fixed template and then drop a
fixed number of leading positions from the text encoder's output, a number
computed for the real tokenizer:

* ``HunyuanVideoPipeline``: Llama-3 chat template, ``crop_start=95``;
* ``QwenImagePipeline``: Qwen chat template, ``prompt_template_encode_start_idx=34``;
* ``QwenImageEditPipeline``: Qwen chat template, ``prompt_template_encode_start_idx=64``;

and ``Lumina2Pipeline`` prepends a ~30-word system prompt and truncates at 256
tokens. With character-level test tokenizers those numbers land in the
middle of the user's prompt (or past it), so different prompts give the same
output.

We do NOT override the templates. Instead each tiny tokenizer is a real
transformers tokenizer class (``LlamaTokenizer``, ``CLIPTokenizer``,
``T5Tokenizer``, ``GemmaTokenizer``, ``Qwen2Tokenizer``) constructed through
its own ``__init__`` from a vocabulary built here: every byte/character
(so any prompt tokenizes, and different text gives different ids), whole-word
tokens for every word of the pipelines' templates and system prompts, and a
few hundred common prompt words. Word tokens come from explicit BPE merge
chains (``w``, ``wo``, ``wor``, ``word``), repaired until every listed word is
one token. The template prefix (everything before the user's text) then tokenizes
to exactly the count the pipeline drops, as with the real tokenizers: 34 and
64 are word-and-punctuation counts under Qwen2's own pre-tokenizer, and 95
comes out of the Llama-style tokenizer once, as in Llama-3, ``"\n\n"`` is one
token and a digit does not join the space before it. The build checks each
count against the live pipeline's own template and drop count (so a diffusers
upgrade that changes a template fails the build rather than silently
cropping prompts) and records it in the manifest (``template_prefix_tokens``).

So the production call path is the tiny call path: runners pass no template
override, and the real checkpoints' real tokenizers meet the same templates.
Tokenizers that pad are saved with ``padding_side="right"``, which the
crop-from-the-left templates (and Lumina2's caption lengths) require.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "genguard_tiny.json"
# Bump when the tiny architecture or tokenizers change: a directory built by an
# older builder is then rebuilt instead of being taken as complete.
BUILDER_VERSION = 1

# --------------------------------------------------------------------------
# Templates the pipelines apply (copied here only to size the vocabularies;
# the pipelines keep using their own copies at call time).
# --------------------------------------------------------------------------

HUNYUAN_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
LUMINA2_SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts."
)
LUMINA2_SEPARATOR = " <Prompt Start> "

# Common words of image/video prompts, so typical prompts tokenize to words
# rather than characters. Fixed: changing it changes every tiny model.
PROMPT_WORDS = """
a an the of and or with in on at by for from to into over under near behind above below
is are was be being very some many one two three four five six seven eight nine ten
red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright
cat cats dog dogs fox foxes bird birds fish horse cow sheep lion tiger bear wolf rabbit mouse monkey
dragon robot person man woman men women child children boy girl people face eyes hair hand hands
tree trees forest flower flowers grass garden field mountain mountains hill river lake sea ocean beach
wave waves sky cloud clouds sun moon star stars rain snow fog storm night day morning evening sunset
sunrise city street road bridge building house castle tower room window door table chair car boat
train plane ship bicycle fire water ice stone rock sand wood metal glass paper
small big large tiny huge tall short long old young new beautiful cute happy sad calm quiet
running walking flying swimming jumping dancing sitting standing sleeping eating playing looking
photo photograph painting drawing sketch portrait landscape illustration render anime cartoon
style realistic detailed high quality sharp soft blurry cinematic dramatic lighting shadow
color colors colorful vibrant warm cold golden hour close up view wide shot camera slow motion
background foreground center left right top bottom side front back edge corner
make turn change add remove replace keep same into like wearing holding
""".split()

# --------------------------------------------------------------------------
# Tokenizer construction
# --------------------------------------------------------------------------

_WORD_RE = re.compile(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]")
_SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>|<Prompt Start>")


def _text_words(texts: Iterable[str]) -> list[str]:
    """Words, digits and punctuation marks of ``texts``, in first-seen order."""
    out: dict[str, None] = {}
    for text in texts:
        for w in _WORD_RE.findall(_SPECIAL_RE.sub(" ", text)):
            out.setdefault(w, None)
    return list(out)


def _chain_bpe(
    alphabet: Sequence[str],
    pieces: Sequence[Sequence[str]],
    bpe_kwargs: dict[str, Any],
    to_model_input: Callable[[Sequence[str]], str],
) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens and merges that make every piece (a list of base symbols) one token.

    Starts from left-to-right merge chains, then repairs words that an earlier
    merge split differently: after all existing merges, join what is left of
    the word, left to right, with extra (lower-priority) merges.
    """
    from tokenizers.models import BPE

    tokens: dict[str, None] = dict.fromkeys(alphabet)
    merges: list[tuple[str, str]] = []
    merge_set: set[tuple[str, str]] = set()

    def add_chain(symbols: Sequence[str]) -> None:
        cur = symbols[0]
        for sym in symbols[1:]:
            pair = (cur, sym)
            if pair not in merge_set:
                merge_set.add(pair)
                merges.append(pair)
            cur = cur + sym
            tokens.setdefault(cur, None)

    for symbols in pieces:
        if len(symbols) > 1:
            add_chain(symbols)
    for _ in range(8):
        vocab = {t: i for i, t in enumerate(tokens)}
        model = BPE(vocab=vocab, merges=list(merges), **bpe_kwargs)
        broken = []
        for symbols in pieces:
            got = [t.value for t in model.tokenize(to_model_input(symbols))]
            if len(got) > 1:
                broken.append(got)
        if not broken:
            return list(tokens), merges
        for got in broken:
            add_chain(got)
    raise RuntimeError("tiny BPE vocabulary did not converge")


_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
_PRINTABLE = [chr(c) for c in range(33, 127)]


def _metaspace_pieces(words: Iterable[str]) -> list[list[str]]:
    """Pieces for ``▁``-metaspace tokenizers: each word with and without ``▁``.

    Digits never join the ``▁`` before them and ``"\n\n"`` is one token, as in
    the Llama-3 tokenizer HunyuanVideo's ``crop_start=95`` was counted with.
    """
    pieces = [["\n", "\n"]]
    for w in words:
        if not w.isdigit():
            pieces.append(["▁", *w])
        if len(w) > 1:
            pieces.append(list(w))
    return pieces


def _llama_tokenizer(words: Sequence[str]) -> Any:
    """Llama-style BPE (``▁`` metaspace, byte fallback), as HunyuanVideo's ``LlamaTokenizerFast``."""
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chat = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    alphabet = [*_BYTE_TOKENS, "▁", "\n", *_PRINTABLE]
    tokens, merges = _chain_bpe(
        alphabet,
        _metaspace_pieces(words),
        {"fuse_unk": True, "byte_fallback": True},
        lambda syms: "".join(syms),
    )
    vocab: dict[str, int] = {}
    for t in [*specials, *tokens, *chat]:
        vocab.setdefault(t, len(vocab))
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=1024,
    )
    tok.add_special_tokens({"additional_special_tokens": chat})
    return tok


def _gemma_tokenizer(words: Sequence[str]) -> Any:
    """Gemma-style BPE (``▁`` for spaces, byte fallback), as Lumina2's ``GemmaTokenizerFast``."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    alphabet = [*_BYTE_TOKENS, "▁", "\n", *_PRINTABLE]
    tokens, merges = _chain_bpe(
        alphabet,
        _metaspace_pieces(words),
        {"fuse_unk": True, "byte_fallback": True, "unk_token": "<unk>"},
        lambda syms: "".join(syms),
    )
    vocab: dict[str, int] = {}
    for t in [*specials, *tokens]:
        vocab.setdefault(t, len(vocab))
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=1024,
    )


def _byte_level_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def _qwen_tokenizer(texts: Sequence[str]) -> Any:
    """Byte-level BPE with Qwen2's own pre-tokenizer, as Qwen-Image's ``Qwen2Tokenizer``."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    probe = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])
    pre = probe.backend_tokenizer.pre_tokenizer
    pieces: list[list[str]] = []
    for text in texts:
        for chunk in _SPECIAL_RE.split(text):
            pieces += [list(p) for p, _ in pre.pre_tokenize_str(chunk)]
    tokens, merges = _chain_bpe(
        _byte_level_alphabet(),
        pieces,
        {"continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False},
        lambda syms: "".join(syms),
    )
    vocab: dict[str, int] = {}
    for t in [*tokens, *specials, *vision]:
        vocab.setdefault(t, len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        padding_side="right",
        model_max_length=32768,
    )
    tok.add_special_tokens({"additional_special_tokens": [*specials[1:], *vision]})
    return tok


def _clip_tokenizer(words: Sequence[str]) -> Any:
    """CLIP byte-level BPE with ``</w>`` word ends, as HunyuanVideo's ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    probe = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    norm = probe.backend_tokenizer.normalizer
    pre = probe.backend_tokenizer.pre_tokenizer
    pieces: list[list[str]] = []
    for w in words:
        for p, _ in pre.pre_tokenize_str(norm.normalize_str(w)):
            pieces.append([*p[:-1], p[-1] + "</w>"])
    tokens, merges = _chain_bpe(
        [*alphabet, *(c + "</w>" for c in alphabet)],
        pieces,
        {"continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": False},
        lambda syms: "".join(syms)[: -len("</w>")],
    )
    vocab: dict[str, int] = {}
    for t in [*tokens, "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        padding_side="right",
        model_max_length=77,
    )


def _t5_tokenizer(words: Sequence[str]) -> Any:
    """SentencePiece-unigram style vocabulary, as Wan's UMT5 ``T5TokenizerFast``.

    Whole words score higher than their characters, so Viterbi picks words;
    every printable character (with and without ``▁``) is a piece, so other
    words still tokenize.
    """
    from transformers import T5Tokenizer

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -3.0}
    for c in _PRINTABLE:
        pieces.setdefault(c, -6.0)
        pieces.setdefault("▁" + c, -6.5)
    for c in (chr(x) for x in range(0xA1, 0x180)):  # Latin-1 supplement and Latin extended-A
        pieces.setdefault(c, -8.0)
    for w in words:
        pieces.setdefault("▁" + w, -2.0)
        pieces.setdefault(w, -2.5)
    return T5Tokenizer(
        vocab=list(pieces.items()), extra_ids=0, padding_side="right", model_max_length=512
    )


def template_prefix_tokens(pipe: Any) -> tuple[int, int] | None:
    """``(tokens of the template prefix, tokens the pipeline drops)`` for ``pipe``'s own template.

    Read from the live pipeline, not from this module's copies, so a diffusers
    upgrade that changes a template fails the build instead of silently
    cropping prompts. None for pipelines that drop nothing.
    """
    name = type(pipe).__name__
    if name == "HunyuanVideoPipeline":
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
        dropped = int(DEFAULT_PROMPT_TEMPLATE["crop_start"])
    elif hasattr(pipe, "prompt_template_encode_start_idx"):  # the Qwen-Image family
        # The drop covers the system turn and "<|im_start|>user\n"; the edit
        # template's vision tokens and the user's text follow it.
        prefix = pipe.prompt_template_encode.split("{}")[0].split("<|vision_start|>")[0]
        dropped = int(pipe.prompt_template_encode_start_idx)
    else:
        return None
    return len(pipe.tokenizer(prefix)["input_ids"]), dropped


def _verify_prompt_template(pipe: Any) -> dict[str, Any]:
    """Fail the build unless the user's prompt survives the pipeline's template handling."""
    counts = template_prefix_tokens(pipe)
    if counts is not None:
        n, dropped = counts
        if n != dropped:
            raise RuntimeError(
                f"{type(pipe).__name__}: the template prefix is {n} tiny tokens but the pipeline "
                f"drops {dropped}; the tiny vocabulary no longer matches the template"
            )
        return {"template_prefix_tokens": n}
    system_prompt = getattr(pipe, "system_prompt", None)
    if system_prompt:  # Lumina2: system prompt + separator precede the prompt, 256 tokens in all
        n = len(pipe.tokenizer(system_prompt + LUMINA2_SEPARATOR)["input_ids"])
        if n > 64:
            raise RuntimeError(f"{type(pipe).__name__}: the system prompt takes {n} of 256 tokens")
        return {"system_prompt_tokens": n}
    return {}


# --------------------------------------------------------------------------
# Components per family
# --------------------------------------------------------------------------


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _hunyuan_video(seed: int) -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    words = list(dict.fromkeys([*PROMPT_WORDS, *_text_words([HUNYUAN_TEMPLATE])]))
    tokenizer = _llama_tokenizer(words)
    tokenizer_2 = _clip_tokenizer(words)

    _seed(seed)
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-3]
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    _seed(seed + 1)
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=8,
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id,
        )
    )
    _seed(seed + 2)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    _seed(seed + 3)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    components = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
    }
    return components


def _wan_text(seed: int) -> tuple[Any, Any]:
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer(PROMPT_WORDS)
    _seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    return tokenizer, text_encoder


def _wan_vae(seed: int) -> Any:
    from diffusers import AutoencoderKLWan

    _seed(seed)
    return AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def _wan_t2v(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    tokenizer, text_encoder = _wan_text(seed)
    vae = _wan_vae(seed + 1)
    _seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    components = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }
    return components


def _wan_i2v(seed: int) -> dict[str, Any]:
    """Wan2.1-I2V layout: CLIP image encoder, ``added_kv_proj_dim`` = inner dim, 36 input channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    tokenizer, text_encoder = _wan_text(seed)
    vae = _wan_vae(seed + 1)
    _seed(seed + 2)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            projection_dim=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    _seed(seed + 3)
    heads, head_dim = 2, 12
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=36,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=8,
        added_kv_proj_dim=heads * head_dim,
        rope_max_seq_len=64,
    )
    components = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "image_encoder": image_encoder,
        "image_processor": image_processor,
    }
    return components


def _lumina2(seed: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    words = list(
        dict.fromkeys([*PROMPT_WORDS, *_text_words([LUMINA2_SYSTEM_PROMPT, LUMINA2_SEPARATOR])])
    )
    tokenizer = _gemma_tokenizer(words)
    _seed(seed)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,  # the pipeline reads hidden_states[-2]
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=1024,
            sliding_window=256,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    _seed(seed + 1)
    # Four blocks, so the VAE downsamples 8x: Lumina2Pipeline hard-codes vae_scale_factor=8.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    _seed(seed + 2)
    transformer = Lumina2Transformer2DModel(
        sample_size=8,  # latent size of the 64x64 default
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        norm_eps=1e-5,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(300, 64, 64),
        cap_feat_dim=16,
    )
    components = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }
    return components


def _qwen_text_encoder(seed: int, tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [1, 1, 2],
                "rope_theta": 1000000.0,
            },
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "fullatt_block_indexes": [1],
            "window_size": 56,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen_common(seed: int, tokenizer: Any, vae_base_dim: int) -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )

    text_encoder = _qwen_text_encoder(seed, tokenizer)
    z_dim = 4
    _seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=vae_base_dim,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 8x spatial, as the real VAE
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    _seed(seed + 2)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,  # 2x2-packed latents
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256,
            base_shift=0.5,
            max_image_seq_len=8192,
            max_shift=0.9,
            shift_terminal=0.02,
            use_dynamic_shifting=True,
        ),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }


def _qwen_image(seed: int) -> dict[str, Any]:
    tokenizer = _qwen_tokenizer([QWEN_TEMPLATE, " ".join(PROMPT_WORDS)])
    # A 16-channel VAE: the 4-channel one decodes to a nearly flat gray image.
    return _qwen_common(seed, tokenizer, vae_base_dim=16)


def _qwen_image_edit(seed: int) -> dict[str, Any]:
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from serve_app.models.qwen_image import ensure_qwen2vl_processor_loadable

    ensure_qwen2vl_processor_loadable()
    tokenizer = _qwen_tokenizer([QWEN_EDIT_TEMPLATE, " ".join(PROMPT_WORDS)])
    # A 4-channel VAE: the pipeline VAE-encodes the ~1024x1024 resized input,
    # which dominates the call (about 4x slower with 16 channels).
    components = _qwen_common(seed, tokenizer, vae_base_dim=4)
    # The pipeline resizes the input to ~1024x1024 before the processor; the
    # processor's pixel bounds then keep the vision sequence tiny (4x4 patches
    # of 14 px, merged 2x2: 4 image tokens).
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    components["processor"] = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return components


def _qwen_edit_add_video_processor(model_dir: Path) -> None:
    """Give the saved processor a video-processor section (real checkpoints have one).

    Without torchvision the processor is built without its video processor and
    saves none; where torchvision imports, ``Qwen2VLProcessor.from_pretrained``
    requires one, so the tiny directory loads on such machines too.
    """
    path = model_dir / "processor" / "processor_config.json"
    config = json.loads(path.read_text())
    image = config.get("image_processor", {})
    config.setdefault(
        "video_processor",
        {
            "video_processor_type": "Qwen2VLVideoProcessor",
            **{
                k: image[k]
                for k in (
                    "image_mean",
                    "image_std",
                    "patch_size",
                    "temporal_patch_size",
                    "merge_size",
                    "size",
                )
                if k in image
            },
        },
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# Specs, build, CLI
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    key: str
    pipeline_class: str
    seed: int
    components: Callable[[int], dict[str, Any]]
    width: int = 64
    height: int = 64
    num_frames: int | None = None
    after_save: Callable[[Path], None] | None = None

    def default_size(self) -> dict[str, int]:
        size = {"width": self.width, "height": self.height}
        if self.num_frames is not None:
            size["num_frames"] = self.num_frames
        return size


SPECS: dict[str, TinySpec] = {
    s.key: s
    for s in (
        TinySpec("hunyuan-video", "HunyuanVideoPipeline", 1001, _hunyuan_video, num_frames=9),
        TinySpec("wan-t2v", "WanPipeline", 1002, _wan_t2v, num_frames=9),
        TinySpec("wan-i2v", "WanImageToVideoPipeline", 1003, _wan_i2v, num_frames=9),
        TinySpec("wan-ati", "WanImageToVideoPipeline", 1004, _wan_i2v, num_frames=9),
        TinySpec("newbie-image", "Lumina2Pipeline", 1005, _lumina2),
        TinySpec("qwen-image", "QwenImagePipeline", 1006, _qwen_image),
        TinySpec(
            "qwen-image-edit",
            "QwenImageEditPipeline",
            1007,
            _qwen_image_edit,
            after_save=_qwen_edit_add_video_processor,
        ),
    )
}


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The tiny manifest of ``model_dir``, or None if it is not a tiny model dir."""
    try:
        data = json.loads((Path(model_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(model_dir: Path, key: str) -> bool:
    """True when ``model_dir`` holds a finished build of ``key`` by this builder version."""
    m = read_manifest(model_dir)
    return m is not None and m.get("key") == key and m.get("builder_version") == BUILDER_VERSION


def _build_one(spec: TinySpec, target: Path) -> None:
    """Build ``spec`` in a temporary sibling of ``target``, then rename it into place."""
    import diffusers
    from transformers.utils import logging as hf_logging

    if target.exists() and read_manifest(target) is None:
        raise FileExistsError(
            f"{target} exists but is not a genguard tiny model (no {MANIFEST_NAME}); "
            "remove it or build into another --out"
        )
    pipe = getattr(diffusers, spec.pipeline_class)(**spec.components(spec.seed))
    checks = _verify_prompt_template(pipe)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.key}-", dir=target.parent))
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar per component
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the models are not secrets
        pipe.save_pretrained(tmp, safe_serialization=True)
        if spec.after_save is not None:
            spec.after_save(tmp)
        manifest = {
            "genguard_tiny": True,
            "builder_version": BUILDER_VERSION,
            "key": spec.key,
            "class": spec.pipeline_class,
            "seed": spec.seed,
            "default": spec.default_size(),
            "dtype": "float32",
            **checks,
        }
        # Written last: a directory with a manifest is complete.
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():  # built by an older builder version: swap it out
            old = Path(tempfile.mkdtemp(prefix=f".old-{spec.key}-", dir=target.parent))
            os.replace(target, old / spec.key)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target, spec.key):
                raise
            # A concurrent build of the same key finished first; keep its result.
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build(out_dir: Path, keys: Iterable[str] | None = None) -> dict[str, Path]:
    """Build the tiny pipeline of each key (all keys by default) under ``out_dir``.

    Returns ``{key: model_dir}``. Keys whose directory is already complete are
    left untouched.
    """
    out_dir = Path(out_dir)
    selected = list(SPECS) if keys is None else list(dict.fromkeys(keys))
    unknown = [k for k in selected if k not in SPECS]
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; known: {sorted(SPECS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    for key in selected:
        target = out_dir / key
        if not is_complete(target, key):
            _build_one(SPECS[key], target)
        result[key] = target
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.tiny", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build tiny random-weight pipelines (offline)")
    b.add_argument("--out", type=Path, default=Path(".models/tiny"), help="output directory")
    b.add_argument(
        "--only", nargs="+", metavar="KEY", choices=sorted(SPECS), help="build only these keys"
    )
    args = parser.parse_args(argv)

    keys = args.only or list(SPECS)
    out: Path = args.out
    before = {k: is_complete(out / k, k) for k in keys}
    paths = build(out, keys)
    for key, path in paths.items():
        print(f"{'skipped (complete)' if before[key] else 'built'}: {key} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
