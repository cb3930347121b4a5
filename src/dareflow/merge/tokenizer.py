"""Tokenizer files: read a model's vocabulary from them, write the output tokenizer.

Works on the files as bytes (``{name: bytes}``), so it runs on any store and never
loads a tokenizer through transformers: a model's vocabulary comes from its
``tokenizer.json`` (a fast tokenizer) or, for a slow-only tokenizer (``tokenizer.model``
with ``added_tokens.json``, as WizardMath ships), from its added tokens on top of the
base's vocabulary. The output tokenizer is the start tokenizer's files with tokens
stripped past its rows and the appended tokens added through ``tokenizers`` (so their
ids are checked), ``tokenizer_config.json`` kept in step, and the chat template written
into ``tokenizer_config.json`` (one place every transformers version reads).
"""

from __future__ import annotations

import fnmatch
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from dareflow.io import storage
from dareflow.merge.vocab import ADDED_TOKEN_FLAGS, ModelVocab, OutputVocab
from dareflow.sources.files import read_model_file

#: Tokenizer files of a model folder (fnmatch patterns).
TOKENIZER_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

#: Built-in chat templates (``chat_template: <name>``).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of a model folder belongs to its tokenizer."""
    return any(fnmatch.fnmatchcase(name, p) for p in TOKENIZER_FILE_PATTERNS)


def read_tokenizer_files(uri: str, **storage_options: Any) -> dict[str, bytes]:
    """The tokenizer files of a model folder (empty when it has none)."""
    names = storage.listdir(uri, **storage_options)
    # regular files inside the folder, bounded: never a link out of it or a FIFO
    return {n: read_model_file(uri, n, **storage_options)
            for n in sorted(names) if is_tokenizer_file(n) and not storage.is_temporary(n)}


def _json(files: Mapping[str, bytes], name: str) -> Any:
    try:
        return json.loads(files[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name} is not valid JSON ({e}); restore it from the model's "
                         "source") from None


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def _flags(entry: Mapping[str, Any], special: bool | None = None) -> dict[str, bool]:
    """An added token's settings; missing ones as transformers defaults them."""
    special = bool(entry.get("special", False)) if special is None else special
    defaults = {"special": special, "normalized": not special}
    return {k: special if k == "special" else bool(entry.get(k, defaults.get(k, False)))
            for k in ADDED_TOKEN_FLAGS}


def _special_strings(files: Mapping[str, bytes]) -> set[str]:
    """Token strings named in special_tokens_map.json (values may be dicts or lists)."""
    if "special_tokens_map.json" not in files:
        return set()
    out: set[str] = set()
    for value in _json(files, "special_tokens_map.json").values():
        for item in value if isinstance(value, list) else [value]:
            out.add(item.get("content") if isinstance(item, dict) else item)
    return out


def _added_from_configs(files: Mapping[str, bytes]) -> list[tuple[str, int, dict[str, bool]]]:
    """Added tokens of a slow tokenizer: ``tokenizer_config.json``'s added_tokens_decoder,
    else ``added_tokens.json`` (special when special_tokens_map.json names them)."""
    config = _json(files, TOKENIZER_CONFIG) if TOKENIZER_CONFIG in files else {}
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if isinstance(decoder, dict) and decoder:
        return sorted(((e["content"], int(i), _flags(e)) for i, e in decoder.items()),
                      key=lambda item: item[1])
    if "added_tokens.json" not in files:
        return []
    special = _special_strings(files)
    return sorted(((tok, int(i), _flags({}, tok in special))
                   for tok, i in _json(files, "added_tokens.json").items()),
                  key=lambda item: item[1])


def vocab_from_files(files: Mapping[str, bytes], rows: int,
                     fallback: ModelVocab | None = None) -> ModelVocab | None:
    """A model's vocabulary (tokens with id < ``rows``) from its tokenizer files.

    Args:
        files: The model's tokenizer files.
        rows: Its embedding rows.
        fallback: The base's vocabulary, for a model without ``tokenizer.json``: as in
            mergekit, it is assumed to share the base's regular vocabulary; its own added
            tokens (``added_tokens.json`` / ``tokenizer_config.json``) replace the
            base's tokens at those ids.

    Returns:
        The vocabulary, or ``None`` when there is no ``tokenizer.json`` and no fallback.
    """
    if TOKENIZER_JSON in files:
        data = _json(files, TOKENIZER_JSON)
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            tokens = {str(t): int(i) for t, i in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [piece, score], the id is the position
            tokens = {str(entry[0]): i for i, entry in enumerate(vocab)}
        else:
            tokens = {}
        added = sorted(((e["content"], int(e["id"]), _flags(e))
                        for e in data.get("added_tokens") or []), key=lambda item: item[1])
    elif fallback is not None:
        added = _added_from_configs(files)
        ids = {i for _, i, _ in added}
        tokens = {t: i for t, i in fallback.tokens.items() if i not in ids}
        added = [(t, i, dict(f)) for t, f in fallback.added.items()
                 if (i := fallback.tokens[t]) not in ids] + added
        added.sort(key=lambda item: item[1])
    else:
        return None
    tokens.update({t: i for t, i, _ in added})
    return ModelVocab(
        tokens={t: i for t, i in sorted(tokens.items(), key=lambda item: item[1]) if i < rows},
        added={t: f for t, i, f in added if i < rows},
        rows=rows,
    )


# --------------------------------------------------------------------------- output files


def _strip(data: dict[str, Any], limit: int) -> bool:
    """Remove every token with id >= ``limit`` from a tokenizer.json (mergekit's
    stripped base tokenizer); True when something was removed."""
    changed = False
    added = data.get("added_tokens") or []
    kept = [e for e in added if int(e["id"]) < limit]
    if len(kept) != len(added):
        data["added_tokens"], changed = kept, True
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict) and any(int(i) >= limit for i in vocab.values()):
        gone = {t for t, i in vocab.items() if int(i) >= limit}
        model["vocab"] = {t: i for t, i in vocab.items() if t not in gone}
        if isinstance(model.get("merges"), list):  # BPE: merges that make a removed token
            pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
            model["merges"] = [m for m, (a, b) in zip(model["merges"], pairs)
                               if not {a, b, a + b} & gone]
        changed = True
    elif isinstance(vocab, list) and len(vocab) > limit:
        model["vocab"], changed = vocab[:limit], True
    return changed


def _added_token(tok: str, settings: Mapping[str, bool] | None) -> Any:
    # tokenizers is only needed when a tokenizer is built (imported here, not by units)
    from tokenizers import AddedToken

    if settings is None:  # what add_tokens("tok") makes in transformers and mergekit
        return AddedToken(tok, special=False, normalized=True)
    return AddedToken(tok, **{k: bool(settings[k]) for k in ADDED_TOKEN_FLAGS})


def _check_ids(got: Mapping[str, int], out: OutputVocab) -> None:
    want = {t: i for i, t in enumerate(out.tokens) if t is not None}
    if got != want:
        wrong = sorted(set(want.items()) ^ set(got.items()), key=lambda item: item[1])[:5]
        raise ValueError(
            f"the output tokenizer (from {out.start!r}) does not give the planned ids "
            f"(first differences, token/id: {wrong}); its tokenizer.json has tokens that "
            "collide after normalisation or ids with gaps. Use tokenizer: {source: base} "
            "or fix the tokenizer files")


def build_tokenizer_files(files: Mapping[str, bytes], out: OutputVocab,
                          chat_template: str | None = None) -> dict[str, bytes]:
    """The output tokenizer's files.

    Args:
        files: The tokenizer files of ``out.start``.
        out: The output vocabulary; tokens of the start tokenizer past its part of
            ``out.tokens`` are removed and ``out.appended`` are added, in order.
        chat_template: Written into ``tokenizer_config.json`` (``chat_template.jinja``
            and ``chat_template.json`` are dropped: they would take precedence).

    Returns:
        ``{file name: bytes}``.

    Raises:
        ValueError: tokens must be added or removed but the start has no
            ``tokenizer.json``, or the result does not give the planned ids.
    """
    files = dict(files)
    limit = len(out.tokens) - len(out.appended)
    final_added: list[dict[str, Any]] | None = None
    if TOKENIZER_JSON in files:
        data = _json(files, TOKENIZER_JSON)
        if _strip(data, limit) or out.appended:
            from tokenizers import Tokenizer  # only when tokens change (see _added_token)

            tok = Tokenizer.from_str(json.dumps(data))
            for token, settings in out.appended:
                tok.add_tokens([_added_token(token, settings)])
            _check_ids(tok.get_vocab(with_added_tokens=True), out)
            files[TOKENIZER_JSON] = tok.to_str(pretty=True).encode()
            data = json.loads(files[TOKENIZER_JSON])
        final_added = [{"id": int(e["id"]), "content": e["content"], **_flags(e)}
                       for e in data.get("added_tokens") or []]
    elif out.appended:
        raise ValueError(
            f"the output tokenizer starts from {out.start!r}, which has no tokenizer.json "
            f"(a fast tokenizer), and {len(out.appended)} token(s) must be added "
            f"({[t for t, _ in out.appended][:5]}); save a fast tokenizer there first "
            "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    else:
        final_added = [{"id": i, "content": t, **f} for t, i, f in _added_from_configs(files)
                       if i < limit]
    _sync_added(files, final_added)
    if chat_template is not None:
        set_chat_template(files, chat_template)
    return files


def _sync_added(files: dict[str, bytes], added: list[dict[str, Any]]) -> None:
    """Keep the slow-tokenizer lists of added tokens (where present) equal to ``added``."""
    if TOKENIZER_CONFIG in files:
        config = _json(files, TOKENIZER_CONFIG)
        old = config.get("added_tokens_decoder") if isinstance(config, dict) else None
        if isinstance(old, dict):  # entries of kept ids stay as they were
            decoder = {str(e["id"]): old.get(str(e["id"])) or {
                "content": e["content"], **{k: e[k] for k in sorted(ADDED_TOKEN_FLAGS)}}
                for e in sorted(added, key=lambda e: e["id"])}
            if decoder != config["added_tokens_decoder"]:
                config["added_tokens_decoder"] = decoder
                files[TOKENIZER_CONFIG] = _json_bytes(config)
    if "added_tokens.json" in files:
        listed = _json(files, "added_tokens.json")
        ids = {e["id"] for e in added}
        new = {t: i for t, i in listed.items() if i in ids}
        first = min(listed.values(), default=None)
        new.update({e["content"]: e["id"] for e in added
                    if first is not None and e["id"] >= first})
        if new != listed:
            files["added_tokens.json"] = _json_bytes(dict(sorted(new.items(),
                                                                 key=lambda kv: kv[1])))


def set_chat_template(files: dict[str, bytes], template: str) -> None:
    """Write ``template`` into ``tokenizer_config.json`` (created when missing) and drop
    the separate template files, which transformers would read instead."""
    config = _json(files, TOKENIZER_CONFIG) if TOKENIZER_CONFIG in files else {}
    config["chat_template"] = template
    files[TOKENIZER_CONFIG] = _json_bytes(config)
    for name in _TEMPLATE_FILES:
        files.pop(name, None)


def chat_template_of(files: Mapping[str, bytes]) -> str | None:
    """A tokenizer's chat template (a named-template list gives its ``default``), as
    transformers resolves it: ``chat_template.jinja``, ``chat_template.json``, then
    ``tokenizer_config.json``; stripped of surrounding whitespace."""
    template: Any = None
    if "chat_template.jinja" in files:
        template = files["chat_template.jinja"].decode("utf-8")
    elif "chat_template.json" in files:
        template = _json(files, "chat_template.json").get("chat_template")
    elif TOKENIZER_CONFIG in files:
        template = _json(files, TOKENIZER_CONFIG).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_chat_template(setting: str, files_by_model: Mapping[str, Mapping[str, bytes]]
                          ) -> str | None:
    """The template of ``chat_template: <setting>``.

    ``auto``: the most common template of the models (in the given order, the first
    seen wins a tie), ``None`` when none has one; a built-in name: its text; anything
    else: the literal template.
    """
    if setting == "auto":
        found = [t for files in files_by_model.values() if (t := chat_template_of(files))]
        return Counter(found).most_common(1)[0][0] if found else None
    return CHAT_TEMPLATES.get(setting, setting)
