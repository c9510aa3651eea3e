//! The tokenizer a GGUF file carries in its metadata (`tokenizer.ggml.*`), built the way
//! llama.cpp builds it, so a GGUF model needs no tokenizer file beside it.
//!
//! `gpt2` vocabularies become a byte-level BPE behind the regex pre-tokenizer llama.cpp
//! picks for `tokenizer.ggml.pre`; `llama` vocabularies become a SentencePiece BPE model
//! run through [`TextTokenizer`]'s SentencePiece path.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::error::{ModelError, Result};
use super::sentencepiece::{Piece, PieceType, SpmModel, SpmModelType};
use super::tokenizer::{AddedTokenSpec, TextTokenizer, TokenizerConfig};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_REMOVE_EXTRA_WS: &str = "tokenizer.ggml.remove_extra_whitespaces";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// The `tokenizer.ggml.model` values this module builds.
const SUPPORTED_MODELS: &str = "gpt2, llama";

/// llama.cpp's GPT-2 split; llama.cpp runs a hand-written matcher for exactly this string.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// llama.cpp's Llama 3 split (the HF one with its `(?i:...)` contractions spelled out).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's Qwen2 split: Llama 3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's Qwen3.5 split: Qwen2's with combining marks kept on their letters.
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's Tekken (Mistral Nemo) split.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's GPT-4o split.
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes one `tokenizer.ggml.pre` family.
struct PreTokenizerSpec {
    /// The `tokenizer.ggml.pre` values of the family.
    names: &'static [&'static str],
    /// Regexes applied one after another, each splitting the pieces of the previous one;
    /// matches and the text between them both become pieces.
    regexes: &'static [&'static str],
    /// A word that is itself a token skips the merges (llama.cpp's `ignore_merges`).
    ignore_merges: bool,
    /// Whether BOS is added when `tokenizer.ggml.add_bos_token` is absent.
    add_bos: bool,
}

/// llama.cpp's pre-tokenizer families (`LLAMA_VOCAB_PRE_TYPE_*` in src/llama-vocab.cpp).
const PRE_TOKENIZERS: &[PreTokenizerSpec] = &[
    PreTokenizerSpec {
        names: &["default"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        regexes: &[LLAMA3],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizerSpec {
        names: &["dbrx", "smaug-bpe"],
        regexes: &[LLAMA3],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        // llama.cpp also clears the BOS id for these; `tokenizer.ggml.bos_token_id` decides here.
        names: &["glm4", "chatglm-bpe"],
        regexes: &[LLAMA3],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "exaone4",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
        ],
        regexes: &[GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        regexes: &[r"\p{N}", GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
        ],
        regexes: &[QWEN2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["qwen35"],
        regexes: &[QWEN35],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["falcon"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["poro-chat", "bloom", "gpt3-finnish"],
        regexes: &[r" ?[^(\s|.,!?…。，、।۔،)]+"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["tekken"],
        regexes: &[TEKKEN],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizerSpec {
        names: &["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
        regexes: &[GPT4O],
        ignore_merges: false,
        add_bos: false,
    },
];

/// GGUF token types (gguf-py's `TokenType`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_UNUSED: i64 = 5;
const TOKEN_BYTE: i64 = 6;

/// Builds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata.
pub fn tokenizer_from_gguf(content: &Content, path: &Path) -> Result<TextTokenizer> {
    let meta = Meta {
        map: &content.metadata,
        path,
    };
    let model = meta.required(KEY_MODEL, Meta::string)?;
    let tokens = meta.required(KEY_TOKENS, Meta::strings)?;
    let types = match meta.optional(KEY_TOKEN_TYPE, Meta::ints)? {
        // Without types llama.cpp treats every token as normal.
        None => vec![TOKEN_NORMAL; tokens.len()],
        Some(types) => {
            meta.check_len(KEY_TOKEN_TYPE, types.len(), tokens.len())?;
            for (id, &t) in types.iter().enumerate() {
                if !(TOKEN_NORMAL..=TOKEN_BYTE).contains(&t) {
                    return Err(meta.error(format!(
                        "`{KEY_TOKEN_TYPE}`[{id}] is {t}, not a token type (1 to 6)"
                    )));
                }
            }
            types
        }
    };
    let tokens = unique_tokens(&meta, tokens)?;
    match model {
        "gpt2" => gpt2_tokenizer(&meta, &tokens, &types),
        "llama" => llama_tokenizer(&meta, tokens, &types),
        other => Err(meta.error(format!(
            "`{KEY_MODEL}` is {other:?}, which plait does not tokenize (supported: {SUPPORTED_MODELS})"
        ))),
    }
}

/// The chat template stored in a GGUF file (`tokenizer.chat_template`), if any.
pub fn chat_template_from_gguf(content: &Content) -> Option<String> {
    match content.metadata.get(KEY_CHAT_TEMPLATE)? {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The tokens as llama.cpp keeps them: empty ones renamed, duplicates refused (a duplicate
/// would make text-to-id ambiguous).
fn unique_tokens(meta: &Meta<'_>, tokens: Vec<&str>) -> Result<Vec<String>> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut out = Vec::with_capacity(tokens.len());
    for (id, token) in tokens.into_iter().enumerate() {
        if token.is_empty() {
            out.push(format!("[EMPTY_{id}]"));
            continue;
        }
        if let Some(first) = seen.insert(token, id) {
            return Err(meta.error(format!(
                "`{KEY_TOKENS}` has {token:?} twice, at ids {first} and {id}"
            )));
        }
        out.push(token.to_string());
    }
    Ok(out)
}

/// A `gpt2` vocabulary: byte-level BPE behind llama.cpp's regex pre-tokenizer.
fn gpt2_tokenizer(meta: &Meta<'_>, tokens: &[String], types: &[i64]) -> Result<TextTokenizer> {
    let pre_name = meta.optional(KEY_PRE, Meta::string)?;
    // llama.cpp falls back to "default" (with a warning) when the key is absent.
    let pre_name = pre_name.unwrap_or("default");
    let Some(spec) = PRE_TOKENIZERS.iter().find(|s| s.names.contains(&pre_name)) else {
        let supported: Vec<&str> = PRE_TOKENIZERS
            .iter()
            .flat_map(|s| s.names.iter().copied())
            .collect();
        return Err(meta.error(format!(
            "`{KEY_PRE}` is {pre_name:?}, a pre-tokenizer plait does not know (supported: {})",
            supported.join(", ")
        )));
    };

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let merges = gpt2_merges(&vocab, meta.required(KEY_MERGES, Meta::strings)?);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| meta.error(format!("building the BPE model: {e}")))?;

    let mut pre: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
    for regex in spec.regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| meta.error(format!("pre-tokenizer {pre_name:?}: regex {regex:?}: {e}")))?;
        pre.push(split.into());
    }
    // The regexes did the splitting; ByteLevel only maps bytes to GPT-2's printable chars.
    pre.push(ByteLevel::new(false, true, false).into());

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(Sequence::new(pre)))
        .with_decoder(Some(ByteLevel::default()));

    // llama.cpp (parse_special) matches control, user-defined and unknown tokens in text
    // before pre-tokenizing, so they come out atomically.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter_map(|(text, &t)| match t {
            TOKEN_CONTROL | TOKEN_UNKNOWN => Some(AddedToken::from(text.clone(), true)),
            TOKEN_USER_DEFINED => Some(AddedToken::from(text.clone(), false)),
            _ => None,
        })
        .map(|t| t.normalized(false))
        .collect();
    tokenizer.add_tokens(&added);

    let bos_id = meta.token_id(KEY_BOS, tokens.len())?;
    let eos_id = meta.token_id(KEY_EOS, tokens.len())?;
    let add_bos = meta
        .optional(KEY_ADD_BOS, Meta::bool)?
        .unwrap_or(spec.add_bos);
    let add_eos = meta.optional(KEY_ADD_EOS, Meta::bool)?.unwrap_or(false);
    if let Some(processor) = bos_eos_processor(meta, tokens, (add_bos, bos_id), (add_eos, eos_id))?
    {
        tokenizer.with_post_processor(Some(processor));
    }
    Ok(TextTokenizer::from_tokenizer(tokenizer, bos_id, eos_id))
}

/// The merges as llama.cpp reads them: "a b" split at the first space after the first
/// byte, the first occurrence of a pair ranking it. Merges whose parts or result are not
/// tokens are dropped: llama.cpp could never emit their result as one token either, and
/// `tokenizers` refuses them.
fn gpt2_merges(vocab: &Vocab, lines: Vec<&str>) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::with_capacity(lines.len());
    let mut merges = Vec::with_capacity(lines.len());
    for line in lines {
        let Some((split, _)) = line.char_indices().skip(1).find(|&(_, c)| c == ' ') else {
            continue;
        };
        let (left, right) = (&line[..split], &line[split + 1..]);
        let known = vocab.contains_key(left)
            && vocab.contains_key(right)
            && vocab.contains_key(&format!("{left}{right}"));
        if known && seen.insert((left, right)) {
            merges.push((left.to_string(), right.to_string()));
        }
    }
    merges
}

/// A post-processor that adds BOS and/or EOS when encoding with special tokens; None if
/// neither is wanted.
fn bos_eos_processor(
    meta: &Meta<'_>,
    tokens: &[String],
    (add_bos, bos_id): (bool, Option<u32>),
    (add_eos, eos_id): (bool, Option<u32>),
) -> Result<Option<TemplateProcessing>> {
    let mut single = Vec::new();
    let mut specials = Vec::new();
    for (add, id, name, add_key, key) in [
        (add_bos, bos_id, "bos", KEY_ADD_BOS, KEY_BOS),
        (add_eos, eos_id, "eos", KEY_ADD_EOS, KEY_EOS),
    ] {
        if !add {
            continue;
        }
        // llama.cpp refuses the same combination.
        let id = id.ok_or_else(|| {
            meta.error(format!(
                "`{add_key}` is true (or defaults to it) but `{key}` is not set"
            ))
        })?;
        let text = tokens
            .get(id as usize)
            .ok_or_else(|| meta.error(format!("`{key}` is outside the vocabulary")))?;
        let special = SpecialToken::new(name.to_string(), vec![id], vec![text.clone()])
            .map_err(|e| meta.error(e))?;
        specials.push(special);
        single.push(name);
    }
    if specials.is_empty() {
        return Ok(None);
    }
    if add_bos {
        single.insert(1, "$A");
    } else {
        single.insert(0, "$A");
    }
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(|e| meta.error(format!("BOS/EOS template: {e}")))?
        .special_tokens(specials)
        .build()
        .map(Some)
        .map_err(|e| meta.error(format!("BOS/EOS template: {e}")))
}

/// A `llama` vocabulary: a SentencePiece BPE model with byte fallback, as llama.cpp's SPM
/// tokenizer runs it.
fn llama_tokenizer(meta: &Meta<'_>, tokens: Vec<String>, types: &[i64]) -> Result<TextTokenizer> {
    let scores = meta.required(KEY_SCORES, Meta::floats)?;
    meta.check_len(KEY_SCORES, scores.len(), tokens.len())?;
    // llama.cpp's defaults for SPM vocabularies: <unk> 0, <s> 1, </s> 2.
    let default_id = |id: u32| (id < tokens.len() as u32).then_some(id);
    let unk_id = meta.token_id(KEY_UNK, tokens.len())?.or(default_id(0));
    let bos_id = meta.token_id(KEY_BOS, tokens.len())?.or(default_id(1));
    let eos_id = meta.token_id(KEY_EOS, tokens.len())?.or(default_id(2));
    let add_bos = meta.optional(KEY_ADD_BOS, Meta::bool)?.unwrap_or(true);
    let add_eos = meta.optional(KEY_ADD_EOS, Meta::bool)?.unwrap_or(false);
    // llama.cpp refuses the same combination.
    for (add, id, add_key, id_key) in [
        (add_bos, bos_id, KEY_ADD_BOS, KEY_BOS),
        (add_eos, eos_id, KEY_ADD_EOS, KEY_EOS),
    ] {
        if add && id.is_none() {
            return Err(meta.error(format!(
                "`{add_key}` is true (or defaults to it) but `{id_key}` is not set"
            )));
        }
    }
    let Some(unk_id) = unk_id else {
        return Err(meta.error(format!(
            "`{KEY_UNK}` is not set and the vocabulary is empty"
        )));
    };

    let mut added_tokens_decoder = HashMap::new();
    let mut pieces = Vec::with_capacity(tokens.len());
    for (id, (piece, (&score, &t))) in tokens.into_iter().zip(scores.iter().zip(types)).enumerate()
    {
        let kind = match t {
            TOKEN_UNKNOWN => PieceType::Unknown,
            TOKEN_CONTROL => PieceType::Control,
            TOKEN_USER_DEFINED => PieceType::UserDefined,
            TOKEN_UNUSED => PieceType::Unused,
            TOKEN_BYTE => PieceType::Byte,
            _ => PieceType::Normal,
        };
        // Control and unknown tokens match in text as llama.cpp's parse_special does;
        // user-defined ones the SentencePiece path matches by itself.
        if matches!(kind, PieceType::Control | PieceType::Unknown) {
            added_tokens_decoder.insert(
                id.to_string(),
                AddedTokenSpec {
                    content: piece.clone(),
                    special: true,
                    lstrip: false,
                    rstrip: false,
                    single_word: false,
                },
            );
        }
        pieces.push(Piece { piece, score, kind });
    }
    let token_text = |id: Option<u32>| {
        let piece = pieces.get(id? as usize)?;
        Some(serde_json::Value::String(piece.piece.clone()))
    };
    let config = TokenizerConfig {
        added_tokens_decoder,
        add_bos_token: Some(add_bos),
        add_eos_token: Some(add_eos),
        bos_token: token_text(bos_id),
        eos_token: token_text(eos_id),
        chat_template: None,
        // llama.cpp puts the dummy prefix on every text fragment after a special token.
        legacy: Some(true),
    };
    let spm = SpmModel {
        pieces,
        model_type: SpmModelType::Bpe,
        byte_fallback: true,
        unk_id,
        normalizer_name: "identity".to_string(),
        precompiled_charsmap: Vec::new(),
        add_dummy_prefix: meta
            .optional(KEY_ADD_SPACE_PREFIX, Meta::bool)?
            .unwrap_or(true),
        remove_extra_whitespaces: meta
            .optional(KEY_REMOVE_EXTRA_WS, Meta::bool)?
            .unwrap_or(false),
        escape_whitespaces: true,
    };
    TextTokenizer::from_sentencepiece(&spm, &config, meta.path)
}

/// Typed access to GGUF metadata; every failure names its key.
struct Meta<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl<'a> Meta<'a> {
    fn error(&self, message: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.to_path_buf(),
            message: format!("GGUF tokenizer metadata: {message}"),
        }
    }

    /// The key's value read by `read`, or None when the key is absent.
    fn optional<T>(
        &self,
        key: &str,
        read: impl FnOnce(&'a Value) -> std::result::Result<T, String>,
    ) -> Result<Option<T>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(value) => read(value).map(Some).map_err(|expected| {
                self.error(format!(
                    "`{key}` should be {expected}, found {}",
                    describe(value)
                ))
            }),
        }
    }

    /// The key's value read by `read`; a missing key is an error.
    fn required<T>(
        &self,
        key: &str,
        read: impl FnOnce(&'a Value) -> std::result::Result<T, String>,
    ) -> Result<T> {
        self.optional(key, read)?
            .ok_or_else(|| self.error(format!("the key `{key}` is missing")))
    }

    /// A token id key, checked against the vocabulary size.
    fn token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
        let Some(id) = self.optional(key, Meta::int)? else {
            return Ok(None);
        };
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
            _ => Err(self.error(format!(
                "`{key}` is {id}, outside the vocabulary of {n_tokens} tokens"
            ))),
        }
    }

    /// Per-token arrays must cover every token, as llama.cpp requires.
    fn check_len(&self, key: &str, len: usize, n_tokens: usize) -> Result<()> {
        if len < n_tokens {
            return Err(self.error(format!("`{key}` has {len} entries for {n_tokens} tokens")));
        }
        Ok(())
    }

    fn string(value: &Value) -> std::result::Result<&str, String> {
        match value {
            Value::String(s) => Ok(s),
            _ => Err("a string".into()),
        }
    }

    fn bool(value: &Value) -> std::result::Result<bool, String> {
        match value {
            Value::Bool(b) => Ok(*b),
            _ => Err("a bool".into()),
        }
    }

    fn int(value: &Value) -> std::result::Result<i64, String> {
        integer(value).ok_or_else(|| "an integer".into())
    }

    fn strings(value: &Value) -> std::result::Result<Vec<&str>, String> {
        let expected = || "an array of strings".to_string();
        let Value::Array(items) = value else {
            return Err(expected());
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(expected()),
            })
            .collect()
    }

    fn ints(value: &Value) -> std::result::Result<Vec<i64>, String> {
        let expected = || "an array of integers".to_string();
        let Value::Array(items) = value else {
            return Err(expected());
        };
        items
            .iter()
            .map(|v| integer(v).ok_or_else(expected))
            .collect()
    }

    /// Scores: f32 as written by convert_hf_to_gguf, though llama.cpp also takes integers.
    fn floats(value: &Value) -> std::result::Result<Vec<f32>, String> {
        let expected = || "an array of numbers".to_string();
        let Value::Array(items) = value else {
            return Err(expected());
        };
        items
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => integer(other).map(|i| i as f32).ok_or_else(expected),
            })
            .collect()
    }
}

/// Any GGUF integer type as i64 (u64 values past i64::MAX are not token data).
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::U8(v) => Some(i64::from(*v)),
        Value::I8(v) => Some(i64::from(*v)),
        Value::U16(v) => Some(i64::from(*v)),
        Value::I16(v) => Some(i64::from(*v)),
        Value::U32(v) => Some(i64::from(*v)),
        Value::I32(v) => Some(i64::from(*v)),
        Value::U64(v) => i64::try_from(*v).ok(),
        Value::I64(v) => Some(*v),
        _ => None,
    }
}

/// A value's type for error messages (arrays by their first element's type).
fn describe(value: &Value) -> String {
    match value {
        Value::U8(_) => "u8".into(),
        Value::I8(_) => "i8".into(),
        Value::U16(_) => "u16".into(),
        Value::I16(_) => "i16".into(),
        Value::U32(_) => "u32".into(),
        Value::I32(_) => "i32".into(),
        Value::U64(_) => "u64".into(),
        Value::I64(_) => "i64".into(),
        Value::F32(_) => "f32".into(),
        Value::F64(_) => "f64".into(),
        Value::Bool(_) => "bool".into(),
        Value::String(_) => "string".into(),
        Value::Array(items) => match items.first() {
            None => "an empty array".into(),
            Some(first) => {
                let same = std::mem::discriminant(first);
                if items.iter().all(|v| std::mem::discriminant(v) == same) {
                    format!("an array of {}", describe(first))
                } else {
                    "an array of mixed types".into()
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;
    use std::path::PathBuf;

    /// The default model, from `PLAIT_DEFAULT_GGUF` or plait's data directory.
    fn default_gguf() -> PathBuf {
        if let Some(p) = std::env::var_os("PLAIT_DEFAULT_GGUF") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "PLAIT_DEFAULT_GGUF={} does not exist; run scripts/install-default-model.sh",
                p.display()
            );
            return p;
        }
        let data = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .expect("neither XDG_DATA_HOME nor HOME is set");
        let p = data.join("plait/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.is_file(),
            "the default model {} is missing: run scripts/install-default-model.sh \
             (or set PLAIT_DEFAULT_GGUF to the GGUF file)",
            p.display()
        );
        p
    }

    fn read_content(path: &Path) -> Content {
        let mut f = std::fs::File::open(path).expect("open gguf");
        Content::read(&mut f).expect("read gguf")
    }

    #[test]
    fn smollm2_gguf_matches_llama_cpp() {
        let path = default_gguf();
        let content = read_content(&path);
        let tok = tokenizer_from_gguf(&content, &path).expect("tokenizer");
        let cases: [(&str, &[u32]); 2] = [
            (
                "fn main() {\n    println!(\"Hello, wörld! 🦀\");\n}\n",
                &[
                    7853, 1085, 1000, 1662, 472, 1628, 34115, 17, 1470, 19556, 28, 267, 29989,
                    400, 17, 15107, 116, 218, 21646, 198, 109, 198,
                ],
            ),
            (
                "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 2 spaces\t tab\n",
                &[
                    1604, 3987, 24, 94, 727, 472, 1003, 304, 585, 304, 2067, 216, 34, 1745, 3987,
                    24, 94, 731, 216, 33, 25, 1232, 3987, 24, 94, 731, 216, 34, 25, 216, 907,
                    216, 34, 5600, 197, 10147, 198,
                ],
            ),
        ];
        for (text, want) in cases {
            let ids = tok.encode(text, false).expect("encode");
            assert_eq!(ids, want, "ids for {text:?}");
            assert_eq!(tok.decode(&ids).expect("decode"), text);
        }

        let chat = "<|im_start|>user\nhi<|im_end|>";
        let ids = tok.encode(chat, false).expect("encode");
        assert_eq!(ids.first(), Some(&1), "{ids:?}");
        assert_eq!(ids.last(), Some(&2), "{ids:?}");
        assert_eq!(tok.decode(&ids).expect("decode"), chat);

        // SmolLM2's GGUF names BOS/EOS; whether BOS is added follows its add_bos_token.
        let add_bos = matches!(content.metadata.get(KEY_ADD_BOS), Some(Value::Bool(true)));
        let with_special = tok.encode("hi", true).expect("encode");
        let plain = tok.encode("hi", false).expect("encode");
        if add_bos {
            assert_eq!(with_special[0], tok.bos_id().expect("bos"));
            assert_eq!(&with_special[1..], &plain[..]);
        } else {
            assert_eq!(with_special, plain);
        }
        assert!(tok.eos_id().is_some());
        assert!(chat_template_from_gguf(&content).is_some_and(|t| t.contains("im_start")));
    }

    fn content(entries: Vec<(&str, Value)>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A tiny SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte pieces, then words.
    fn llama_content(extra: Vec<(&str, Value)>) -> Content {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL];
        let mut scores = vec![0.0f32; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TOKEN_BYTE);
            scores.push(0.0);
        }
        let words = [
            "▁", "h", "e", "l", "o", "w", "▁h", "▁he", "▁hel", "▁hell", "▁hello",
        ];
        for (i, w) in words.iter().enumerate() {
            tokens.push(w.to_string());
            types.push(TOKEN_NORMAL);
            scores.push(-(i as f32));
        }
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut entries = vec![
            (KEY_MODEL, Value::String("llama".into())),
            (KEY_TOKENS, strings(&token_refs)),
            (
                KEY_SCORES,
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            (
                KEY_TOKEN_TYPE,
                Value::Array(types.into_iter().map(|t| Value::I32(t as i32)).collect()),
            ),
            (KEY_BOS, Value::U32(1)),
            (KEY_EOS, Value::U32(2)),
            (KEY_UNK, Value::U32(0)),
        ];
        entries.extend(extra);
        content(entries)
    }

    #[test]
    fn llama_vocab_uses_dummy_prefix_and_byte_fallback() {
        let path = Path::new("synthetic.gguf");
        let tok = tokenizer_from_gguf(&llama_content(vec![]), path).expect("tokenizer");
        let id = |piece: &str| {
            let c = llama_content(vec![]);
            let Some(Value::Array(t)) = c.metadata.get(KEY_TOKENS).cloned() else {
                unreachable!()
            };
            t.iter()
                .position(|v| matches!(v, Value::String(s) if s == piece))
                .expect("piece") as u32
        };
        // "hello" gets the dummy prefix and merges to one piece; "é" is not a piece, so it
        // falls back to its UTF-8 bytes.
        let ids = tok.encode("hello wé", false).expect("encode");
        let want = vec![id("▁hello"), id("▁"), id("w"), id("<0xC3>"), id("<0xA9>")];
        assert_eq!(ids, want);
        assert_eq!(tok.decode(&ids).expect("decode"), "hello wé");

        // BOS by default; control tokens match in text, and the text after one gets the prefix.
        let ids = tok.encode("hello</s>hello", true).expect("encode");
        assert_eq!(ids, vec![1, id("▁hello"), 2, id("▁hello")]);
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_id(), Some(2));

        let no_bos = llama_content(vec![(KEY_ADD_BOS, Value::Bool(false))]);
        let tok = tokenizer_from_gguf(&no_bos, path).expect("tokenizer");
        assert_eq!(
            tok.encode("hello", true).expect("encode"),
            vec![id("▁hello")]
        );
    }

    #[test]
    fn gpt2_vocab_from_synthetic_metadata() {
        // Byte-level tokens: "Ġ" is the space byte.
        let tokens = [
            "<|endoftext|>",
            "h",
            "i",
            "Ġ",
            "hi",
            "Ġhi",
            "1",
            "2",
            "<x y>",
        ];
        let types = [3, 1, 1, 1, 1, 1, 1, 1, 4];
        let c = content(vec![
            (KEY_MODEL, Value::String("gpt2".into())),
            (KEY_PRE, Value::String("smollm".into())),
            (KEY_TOKENS, strings(&tokens)),
            (
                KEY_TOKEN_TYPE,
                Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            (KEY_MERGES, strings(&["h i", "Ġ hi", "1 2"])),
            (KEY_BOS, Value::U32(0)),
            (KEY_EOS, Value::U32(0)),
            (KEY_ADD_BOS, Value::Bool(true)),
        ]);
        let tok = tokenizer_from_gguf(&c, Path::new("synthetic.gguf")).expect("tokenizer");
        // Digits are split one by one before BPE (smollm), so "12" never merges.
        let ids = tok
            .encode("hi hi<|endoftext|>12<x y>", true)
            .expect("encode");
        assert_eq!(ids, vec![0, 4, 5, 0, 6, 7, 8]);
        assert_eq!(
            tok.decode(&ids[1..]).expect("decode"),
            "hi hi<|endoftext|>12<x y>"
        );
    }

    #[test]
    fn every_known_pre_tokenizer_builds() {
        // The 256 byte-level chars, so any text encodes.
        let bytes: Vec<String> = (0u32..=0x2ff)
            .filter_map(char::from_u32)
            .filter(|c| ByteLevel::alphabet().contains(c))
            .map(String::from)
            .collect();
        assert_eq!(bytes.len(), 256);
        let refs: Vec<&str> = bytes.iter().map(String::as_str).collect();
        for spec in PRE_TOKENIZERS {
            for name in spec.names {
                let c = content(vec![
                    (KEY_MODEL, Value::String("gpt2".into())),
                    (KEY_PRE, Value::String(name.to_string())),
                    (KEY_TOKENS, strings(&refs)),
                    (KEY_MERGES, strings(&[])),
                    (KEY_BOS, Value::U32(0)),
                ]);
                let tok = tokenizer_from_gguf(&c, Path::new("synthetic.gguf"))
                    .unwrap_or_else(|e| panic!("pre {name}: {e}"));
                let text = "It's 1234 wörlds,\n\n  ok?! 🦀 日本語";
                let ids = tok.encode(text, false).expect("encode");
                assert_eq!(ids.len(), text.len(), "pre {name}: one id per byte");
                assert_eq!(tok.decode(&ids).expect("decode"), text, "pre {name}");
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let path = Path::new("bad.gguf");
        let message = |c: Content| match tokenizer_from_gguf(&c, path) {
            Err(ModelError::Tokenizer { message, .. }) => message,
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("expected an error"),
        };
        let m = message(content(vec![]));
        assert!(m.contains(KEY_MODEL) && m.contains("missing"), "{m}");

        let m = message(content(vec![
            (KEY_MODEL, Value::String("bert".into())),
            (KEY_TOKENS, strings(&["a"])),
        ]));
        assert!(m.contains("\"bert\"") && m.contains("gpt2, llama"), "{m}");

        let m = message(content(vec![
            (KEY_MODEL, Value::String("gpt2".into())),
            (KEY_PRE, Value::String("nope".into())),
            (KEY_TOKENS, strings(&["a"])),
        ]));
        assert!(m.contains("\"nope\"") && m.contains("smollm"), "{m}");

        let m = message(content(vec![
            (KEY_MODEL, Value::String("gpt2".into())),
            (KEY_TOKENS, Value::U32(3)),
        ]));
        assert!(
            m.contains(KEY_TOKENS) && m.contains("array of strings"),
            "{m}"
        );

        let m = message(llama_content(vec![(KEY_SCORES, strings(&["x"]))]));
        assert!(
            m.contains(KEY_SCORES) && m.contains("array of string"),
            "{m}"
        );
    }
}
