"""New speakers on a CustomVoice model: which codec-embedding row each gets, and the checks made before a run.

A CustomVoice checkpoint (tts_model_type custom_voice) has no speaker encoder: each built-in speaker is a row of
the talker's codec input embedding (talker_config.spk_id), and a dialect speaker (spk_is_dialect) is generated
with its dialect's language id whenever the caller asks for chinese or auto. A fine-tune on such a model gives
every new speaker a free row (never a built-in speaker's, a control id's or a language id's) and keeps the
built-in speakers. The new speaker's input at the speaker slot is either
- its mean reference x-vector from the speaker encoder of a Base model of the same size (model.speaker_encoder),
  written into its row at export, or
- without one, the row itself, initialised from the mean of the built-in rows and trained with the model.
A dialect row trains with the dialect's language id, so its speaker must be exported as a dialect speaker; a
Base model cannot export one (its generation offers no dialect), so dialect rows need a CustomVoice model.path.

The assignment (`Voices`) is computed once from the shards at the start, written to RUN/voices.json, and read
back by training.export, so export writes each speaker into the row it trained with.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shared.shard_index import ShardIndex
from training.speakers.reference import speaker_key

FIRST_SPEAKER_ROW = 3000  # where upstream's custom-voice fine-tunes put their speaker; new rows start here
VOICES_FILE = "voices.json"
_CONTROL_KEYS = ("codec_pad_id", "codec_bos_id", "codec_eos_token_id", "codec_think_id", "codec_nothink_id",
                 "codec_think_bos_id", "codec_think_eos_id")
_UNNAMED = ""  # JSON key of the rows without `speaker`


class VoiceProblem(ValueError):
    """A speaker/language/model combination that cannot be trained or exported; the message holds the fix."""


def model_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def is_custom_voice(config: dict) -> bool:
    return config.get("tts_model_type") == "custom_voice"


def is_dialect(language: str | None) -> bool:
    """Dialect language ids exist only for dialect speakers (Qwen3TTSModel offers no language with "dialect")."""
    return bool(language) and "dialect" in language.lower()


@dataclass
class Voices:
    """The speaker rows of a run on a CustomVoice model (keys: lower-cased speaker names, None = unnamed rows)."""
    builtin: dict[str, int]  # the base model's spk_id
    builtin_dialect: dict[str, str | bool]  # the base model's spk_is_dialect
    rows: dict[str | None, int]  # each speaker of the run -> its codec-embedding row
    dialect: dict[str | None, str | bool]  # each speaker of the run -> its dialect key, or False
    learned: bool  # True: the rows themselves train (no model.speaker_encoder)

    def row_of(self, speaker: str | None) -> int:
        key = speaker_key(speaker)
        if key not in self.rows:
            raise KeyError(f"speaker {key or '(rows without speaker)'} was not in the shards when the run started "
                           f"(its speakers: {', '.join(k or '(unnamed)' for k in self.rows)}); start a new run")
        return self.rows[key]

    @property
    def retrained(self) -> set[str]:
        return {k for k in self.rows if k in self.builtin}

    def to_dict(self) -> dict:
        values = asdict(self)
        for name in ("rows", "dialect"):
            values[name] = {_UNNAMED if k is None else k: v for k, v in values[name].items()}
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "Voices":
        values = dict(values)
        for name in ("rows", "dialect"):
            values[name] = {None if k == _UNNAMED else k: v for k, v in values[name].items()}
        return cls(**values)

    def write(self, run_dir: Path) -> None:
        (run_dir / VOICES_FILE).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def read(cls, run_dir: Path) -> "Voices | None":
        path = run_dir / VOICES_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None


@dataclass
class SpeakerLanguages:
    """Each speaker's row languages in the published shards (None: a row without one, or "auto")."""
    languages: dict[str | None, set[str | None]] = field(default_factory=dict)

    def add(self, speaker: str | None, language: str | None) -> None:
        language = (language or "").strip().lower()
        self.languages.setdefault(speaker_key(speaker), set()).add(language if language not in ("", "auto") else None)

    def dialect_of(self, speaker: str | None) -> str | bool:
        """The speaker's dialect key, False for none; VoiceProblem when its rows mix a dialect with anything."""
        languages = self.languages.get(speaker, set())
        dialects = sorted(lang for lang in languages if is_dialect(lang))
        if not dialects:
            return False
        if len(languages) > 1:
            others = ", ".join(sorted(lang or "no language" for lang in languages if lang != dialects[0]))
            raise VoiceProblem(f"speaker {speaker or '(rows without speaker)'} mixes dialect {dialects[0]} with "
                               f"{others} in its rows' `language`; a dialect speaker is generated with its dialect "
                               f"whatever language is asked, so give all its rows {dialects[0]} or split the other "
                               "rows into a speaker of their own")
        return dialects[0]


    @classmethod
    def from_index(cls, index: ShardIndex) -> "SpeakerLanguages":
        """The languages of each speaker's good rows with frames, from the shard index (no shard is read)."""
        table = cls()
        for entry in index.entries.values():
            for figures in entry.speakers:
                for language in figures.languages or [None]:
                    table.add(figures.speaker, language)
        return table


def reserved_rows(talker: dict) -> set[int]:
    """Rows no new speaker may take: built-in speakers, control ids and language ids."""
    taken = {int(v) for v in (talker.get("spk_id") or {}).values()}
    taken |= {int(v) for v in (talker.get("codec_language_id") or {}).values()}
    return taken | {int(talker[k]) for k in _CONTROL_KEYS if talker.get(k) is not None}


def free_rows(talker: dict, count: int) -> list[int]:
    reserved, rows = reserved_rows(talker), []
    row = FIRST_SPEAKER_ROW
    while len(rows) < count and row < int(talker["vocab_size"]):
        if row not in reserved:
            rows.append(row)
        row += 1
    if len(rows) < count:
        raise VoiceProblem(f"{count} new speakers do not fit the free codec-embedding rows {FIRST_SPEAKER_ROW}.."
                           f"{talker['vocab_size'] - 1} of model.path; train fewer speakers per run")
    return rows


def needs_reference(config) -> bool:
    """Whether a row trains only with a ref_audio: its x-vector fills the speaker slot, except on a CustomVoice
    model.path without model.speaker_encoder, where the slot holds the speaker's own trained row."""
    return not is_custom_voice(model_config(config.model.path)) or bool(config.model.speaker_encoder)


def plan_voices(base: dict, languages: SpeakerLanguages, retrain: list[str], learned: bool) -> Voices:
    """Rows and dialect flags for every speaker of the shards on CustomVoice `base` (its config.json)."""
    talker = base["talker_config"]
    builtin = {k.lower(): int(v) for k, v in (talker.get("spk_id") or {}).items()}
    builtin_dialect = {k.lower(): v for k, v in (talker.get("spk_is_dialect") or {}).items()}
    retrain = [speaker_key(name) for name in retrain]
    unknown = [name for name in retrain if name not in builtin]
    if unknown:
        raise VoiceProblem(f"model.retrain_speakers names {', '.join(unknown)}, not a built-in speaker of "
                           f"model.path (those are {', '.join(sorted(builtin))})")
    speakers = sorted(languages.languages, key=lambda k: (k is not None, k or ""))
    clash = [k for k in speakers if k in builtin and k not in retrain]
    if clash:
        raise VoiceProblem(f"speaker {clash[0]} of data.shards is a built-in speaker of model.path; rename it in the "
                           f"manifest (e.g. {clash[0]}_2), or set model.retrain_speakers=[{clash[0]}] to retrain the "
                           "built-in voice on these rows")
    new = [k for k in speakers if k not in builtin]
    rows = dict(zip(new, free_rows(talker, len(new))))
    rows |= {k: builtin[k] for k in speakers if k in builtin}
    dialect = {k: languages.dialect_of(k) for k in speakers}
    known = {k.lower() for k in (talker.get("codec_language_id") or {})}
    for key, value in dialect.items():
        if value and value not in known:
            raise VoiceProblem(f"speaker {key or '(rows without speaker)'}: language {value} is not a dialect of "
                               f"model.path (it has {', '.join(sorted(k for k in known if is_dialect(k))) or 'none'})")
    return Voices(builtin, builtin_dialect, dict(sorted(rows.items(), key=lambda kv: kv[1])), dialect, learned)


def check_speaker_encoder(path: str, base: dict) -> None:
    fix = "point model.speaker_encoder at the Base model of the same size (e.g. Qwen3-TTS-12Hz-1.7B-Base for 1.7B)"
    if not (Path(path) / "config.json").is_file():
        raise VoiceProblem(f"model.speaker_encoder={path}: no config.json there; {fix}")
    encoder_model = model_config(path)
    if encoder_model.get("tts_model_type") != "base":
        raise VoiceProblem(f"model.speaker_encoder={path}: a {encoder_model.get('tts_model_type')} model has no "
                           f"speaker encoder; {fix}")
    width = (encoder_model.get("speaker_encoder_config") or {}).get("enc_dim")
    hidden = base["talker_config"]["hidden_size"]
    if width != hidden:
        raise VoiceProblem(f"model.speaker_encoder={path}: its x-vectors have {width} values but model.path's "
                           f"talker is {hidden} wide (another model size); {fix}")


def check_run(config, index: ShardIndex | None = None) -> Voices | None:
    """The checks of a training config against its model and shards (nothing loaded, nothing written); the
    run's Voices on a CustomVoice model.path, else None. `index`: the run's corpus index where the caller
    holds it; else it is read (training.data.corpus_index: the shards it lacks are read, nothing is written)."""
    base = model_config(config.model.path)
    if index is None:
        from training.data.corpus_index import read_corpus_index
        from training.data.stream import resolve_output_dir

        index = read_corpus_index(resolve_output_dir(config.data.shards), config.checkpoint.logs())[0]
    languages = SpeakerLanguages.from_index(index)
    if not is_custom_voice(base):
        for name, value in (("model.speaker_encoder", config.model.speaker_encoder),
                            ("model.retrain_speakers", config.model.retrain_speakers),
                            ("eval.keep_speakers", config.eval.keep_speakers),
                            ("data.rehearsal_fraction", config.data.rehearsal_fraction)):
            if value:
                raise VoiceProblem(f"{name} applies to a CustomVoice model.path only; {config.model.path} is "
                                   f"a {base.get('tts_model_type')} model: remove {name}")
        for speaker in languages.languages:
            dialect = languages.dialect_of(speaker)
            if dialect:
                raise VoiceProblem(f"speaker {speaker or '(rows without speaker)'} has language {dialect}, which a "
                                   f"model fine-tuned from a Base model.path can never be asked for; fine-tune a "
                                   f"CustomVoice model (model.path) to export a dialect speaker, or use chinese")
        return None
    if config.model.speaker_encoder:
        check_speaker_encoder(config.model.speaker_encoder, base)
    builtin = {k.lower() for k in base["talker_config"].get("spk_id") or {}}
    unknown = [name for name in config.eval.keep_speakers if name.lower() not in builtin]
    if unknown:
        raise VoiceProblem(f"eval.keep_speakers names {', '.join(unknown)}, not a built-in speaker of model.path "
                           f"(those are {', '.join(sorted(builtin))})")
    voices = plan_voices(base, languages, config.model.retrain_speakers, learned=not config.model.speaker_encoder)
    if config.data.rehearsal_fraction:
        from training.eval.keep_check import kept_speakers

        if not kept_speakers(config.eval.keep_speakers, voices):
            raise VoiceProblem("data.rehearsal_fraction: every built-in speaker of eval.keep_speakers is retrained "
                               "(model.retrain_speakers), so none is left to rehearse; set data.rehearsal_fraction=0")
    return voices


def init_learned_rows(embedding: torch.Tensor, voices: Voices) -> None:
    """New speakers' rows start at the mean of the built-in rows (a retrained built-in keeps its own)."""
    if not voices.learned or not voices.builtin:
        return
    with torch.no_grad():
        mean = embedding[sorted(voices.builtin.values())].mean(0)
        for key, row in voices.rows.items():
            if key not in voices.builtin:
                embedding[row] = mean


def load_speaker_encoder(config):
    """model.speaker_encoder's speaker encoder (a Base model of the same size), or None."""
    if not config.model.speaker_encoder:
        return None
    from shared.qwen import load_speaker_encoder as load

    return load(config.model.speaker_encoder)


def start(config, model, run_dir: Path, rank: int, store,
          index: ShardIndex | None) -> tuple[Voices | None, torch.nn.Module | None]:
    """At the start of a run (every rank): the run's Voices (rank 0's, from its corpus `index`, shared through
    the store; a resumed run keeps the rows its checkpoints trained), new trainable rows initialised, and
    model.speaker_encoder's encoder; (None, None) on a Base model.path."""
    if not is_custom_voice(model_config(config.model.path)):
        return None, None
    if rank == 0:
        voices = Voices.read(run_dir) or check_run(config, index)
        voices.write(run_dir)
        store.set(VOICES_FILE, json.dumps(voices.to_dict()))
    else:
        voices = Voices.from_dict(json.loads(store.get(VOICES_FILE)))
    init_learned_rows(model.talker.get_input_embeddings().weight, voices)
    return voices, load_speaker_encoder(config)


def speak(tts, voices: Voices, speaker: str | None, xvector: torch.Tensor | None, text: str, language: str,
          **generate) -> tuple[list, int]:
    """Generate with the current weights as the export will: the speaker installed in `tts` (a Qwen3TTSModel
    of the CustomVoice base holding those weights) as a custom-voice speaker in its row, then upstream
    generate_custom_voice. A dialect speaker is asked for in chinese (its dialect id then applies)."""
    key = speaker_key(speaker)
    name, row, dialect = key or "unnamed", voices.row_of(key), voices.dialect[key]
    if not voices.learned:
        with torch.no_grad():
            weight = tts.model.talker.get_input_embeddings().weight
            weight[row] = xvector.to(weight.device, weight.dtype)
    talker = tts.model.config.talker_config
    talker.spk_id[name], talker.spk_is_dialect[name] = row, dialect
    tts.model.supported_speakers = talker.spk_id.keys()
    return tts.generate_custom_voice(text=text, speaker=name, language="chinese" if dialect else language,
                                     non_streaming_mode=True, **generate)
