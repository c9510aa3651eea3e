//! Text to ids and back: SentencePiece `tokenizer.model` or `tokenizer.json`, added
//! tokens from `tokenizer_config.json`, and streaming detokenization.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Precompiled, Prepend, Replace, Sequence, Strip};
use tokenizers::{
    AddedToken, Model, ModelWrapper, NormalizedString, Normalizer, NormalizerWrapper, Tokenizer,
};

use super::error::{ModelError, Result};
use super::sentencepiece::{PieceType, SpmModel, SpmModelType};

/// The parts of `tokenizer_config.json` plait reads; absent fields take HF's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizerConfig {
    /// Tokens matched atomically in text, by id.
    #[serde(default)]
    pub added_tokens_decoder: HashMap<String, AddedTokenSpec>,
    /// Whether encoding prepends BOS.
    pub add_bos_token: Option<bool>,
    /// Whether encoding appends EOS.
    pub add_eos_token: Option<bool>,
    /// The BOS token, as a string or `{"content": ...}`.
    pub bos_token: Option<serde_json::Value>,
    /// The EOS token, as a string or `{"content": ...}`.
    pub eos_token: Option<serde_json::Value>,
    /// The chat template: a string, or a list of `{name, template}`.
    pub chat_template: Option<serde_json::Value>,
    /// SentencePiece legacy mode: a dummy prefix after every added token (HF's default).
    pub legacy: Option<bool>,
}

/// One entry of `added_tokens_decoder`.
#[derive(Debug, Clone, Deserialize)]
pub struct AddedTokenSpec {
    /// The token's text.
    pub content: String,
    /// Whether it is a special (control) token.
    #[serde(default)]
    pub special: bool,
    /// Whether it swallows whitespace on its left.
    #[serde(default)]
    pub lstrip: bool,
    /// Whether it swallows whitespace on its right.
    #[serde(default)]
    pub rstrip: bool,
    /// Whether it only matches as a whole word.
    #[serde(default)]
    pub single_word: bool,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`; a missing file gives the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let de = &mut serde_json::Deserializer::from_str(&text);
                serde_path_to_error::deserialize(de).map_err(|e| ModelError::Config {
                    path,
                    field: e.path().to_string(),
                    message: e.inner().to_string(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ModelError::Io { path, source }),
        }
    }

    /// The text of a token field given as a string or as `{"content": ...}`.
    pub fn token_text(value: Option<&serde_json::Value>) -> Option<String> {
        match value? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    }
}

/// An added token as matched in text.
#[derive(Debug, Clone)]
struct Added {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

/// A SentencePiece model run through the `tokenizers` crate's model and normalizers.
struct SpmBackend {
    model: ModelWrapper,
    /// Normalizer for text segments that get the dummy prefix, and for those that do not.
    with_prefix: NormalizerWrapper,
    without_prefix: NormalizerWrapper,
    /// Every segment gets the prefix (legacy), or only one at the start of the text.
    prefix_every_segment: bool,
    add_dummy_prefix: bool,
    /// Piece text by id, `▁` already turned into a space; byte pieces as their byte.
    pieces: Vec<PieceText>,
}

#[derive(Debug, Clone)]
enum PieceText {
    Text(String),
    Byte(u8),
}

enum Backend {
    SentencePiece(Box<SpmBackend>),
    Json(Box<Tokenizer>),
}

/// A model's tokenizer: encodes text (added tokens first), decodes ids, streams text.
pub struct TextTokenizer {
    backend: Backend,
    /// Added tokens, longest first within each first byte (SentencePiece backend only;
    /// `tokenizers` matches them itself for tokenizer.json).
    added: HashMap<u8, Vec<Added>>,
    added_by_id: HashMap<u32, String>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

fn tokenizer_error(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` if the directory has one, else `tokenizer.model`; None if neither.
    pub fn from_dir(dir: &Path, config: &TokenizerConfig) -> Result<Option<Self>> {
        let json = dir.join("tokenizer.json");
        let spm = dir.join("tokenizer.model");
        if json.is_file() {
            Self::from_json(&json, config).map(Some)
        } else if spm.is_file() {
            let bytes = std::fs::read(&spm).map_err(|source| ModelError::Io {
                path: spm.clone(),
                source,
            })?;
            let model = SpmModel::parse(&bytes).map_err(|e| tokenizer_error(&spm, e))?;
            Self::from_sentencepiece(&model, config, &spm).map(Some)
        } else {
            Ok(None)
        }
    }

    fn from_json(path: &PathBuf, config: &TokenizerConfig) -> Result<Self> {
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| tokenizer_error(path, e))?;
        let mut added_by_id = HashMap::new();
        for (id, spec) in sorted_added(config, path)? {
            if tokenizer.token_to_id(&spec.content).is_none() {
                let token = AddedToken::from(spec.content.clone(), spec.special)
                    .lstrip(spec.lstrip)
                    .rstrip(spec.rstrip)
                    .single_word(spec.single_word)
                    .normalized(false);
                tokenizer.add_tokens(&[token]);
            }
            match tokenizer.token_to_id(&spec.content) {
                Some(got) if got == id => {}
                got => {
                    return Err(tokenizer_error(
                        path,
                        format!("added token {:?} is id {id} in tokenizer_config.json but {got:?} in tokenizer.json", spec.content),
                    ))
                }
            }
            added_by_id.insert(id, spec.content.clone());
        }
        let id_of = |value: Option<&serde_json::Value>| {
            TokenizerConfig::token_text(value).and_then(|t| tokenizer.token_to_id(&t))
        };
        let (bos_id, eos_id) = (
            id_of(config.bos_token.as_ref()),
            id_of(config.eos_token.as_ref()),
        );
        Ok(Self {
            backend: Backend::Json(Box::new(tokenizer)),
            added: HashMap::new(),
            added_by_id,
            bos_id,
            eos_id,
            // tokenizer.json's own post-processor adds BOS/EOS when asked to.
            add_bos: false,
            add_eos: false,
        })
    }

    /// Wraps a built `tokenizers::Tokenizer`; BOS/EOS, if wanted, come from its post-processor.
    pub(crate) fn from_tokenizer(
        tokenizer: Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
    ) -> Self {
        Self {
            backend: Backend::Json(Box::new(tokenizer)),
            added: HashMap::new(),
            added_by_id: HashMap::new(),
            bos_id,
            eos_id,
            // As for tokenizer.json: `encode` leaves BOS/EOS to the post-processor.
            add_bos: false,
            add_eos: false,
        }
    }

    /// Builds the SentencePiece backend from a parsed model and the config's added tokens.
    pub(crate) fn from_sentencepiece(
        spm: &SpmModel,
        config: &TokenizerConfig,
        path: &Path,
    ) -> Result<Self> {
        let model: ModelWrapper = match spm.model_type {
            SpmModelType::Bpe => bpe_from_pieces(spm)
                .map_err(|e| tokenizer_error(path, e))?
                .into(),
            SpmModelType::Unigram => {
                let vocab = spm
                    .pieces
                    .iter()
                    .map(|p| (p.piece.clone(), p.score as f64))
                    .collect();
                Unigram::from(vocab, Some(spm.unk_id as usize), spm.byte_fallback)
                    .map_err(|e| tokenizer_error(path, e))?
                    .into()
            }
            other => {
                return Err(tokenizer_error(
                    path,
                    format!("SentencePiece model type {other:?} is not supported"),
                ))
            }
        };
        let (with_prefix, without_prefix) =
            spm_normalizers(spm).map_err(|e| tokenizer_error(path, e))?;
        let pieces = spm
            .pieces
            .iter()
            .map(|p| match (p.kind, byte_piece(&p.piece)) {
                (PieceType::Byte, Some(b)) => PieceText::Byte(b),
                (PieceType::Control | PieceType::Unknown, _) => PieceText::Text(String::new()),
                _ => PieceText::Text(p.piece.replace('\u{2581}', " ")),
            })
            .collect();
        let mut added: HashMap<u8, Vec<Added>> = HashMap::new();
        let mut added_by_id = HashMap::new();
        // User-defined pieces are matched atomically by SentencePiece itself.
        let user_defined = spm
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == PieceType::UserDefined)
            .map(|(id, p)| {
                (
                    id as u32,
                    AddedTokenSpec {
                        content: p.piece.clone(),
                        special: false,
                        lstrip: false,
                        rstrip: false,
                        single_word: false,
                    },
                )
            });
        for (id, spec) in user_defined.chain(sorted_added(config, path)?) {
            let Some(&first) = spec.content.as_bytes().first() else {
                return Err(tokenizer_error(path, format!("added token {id} is empty")));
            };
            added_by_id.insert(id, spec.content.clone());
            added.entry(first).or_default().push(Added {
                content: spec.content,
                id,
                lstrip: spec.lstrip,
                rstrip: spec.rstrip,
                single_word: spec.single_word,
            });
        }
        for list in added.values_mut() {
            list.sort_by(|a, b| b.content.len().cmp(&a.content.len()).then(a.id.cmp(&b.id)));
        }
        let piece_id = |value: Option<&serde_json::Value>| {
            let text = TokenizerConfig::token_text(value)?;
            added_by_id
                .iter()
                .find(|(_, c)| **c == text)
                .map(|(id, _)| *id)
                .or_else(|| {
                    spm.pieces
                        .iter()
                        .position(|p| p.piece == text)
                        .map(|i| i as u32)
                })
        };
        let (bos_id, eos_id) = (
            piece_id(config.bos_token.as_ref()),
            piece_id(config.eos_token.as_ref()),
        );
        Ok(Self {
            backend: Backend::SentencePiece(Box::new(SpmBackend {
                model,
                with_prefix,
                without_prefix,
                prefix_every_segment: config.legacy.unwrap_or(true),
                add_dummy_prefix: spm.add_dummy_prefix,
                pieces,
            })),
            added,
            added_by_id,
            bos_id,
            eos_id,
            // HF's LlamaTokenizer defaults: BOS on, EOS off.
            add_bos: config.add_bos_token.unwrap_or(true),
            add_eos: config.add_eos_token.unwrap_or(false),
        })
    }

    /// The BOS id, if the tokenizer names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS id, if the tokenizer names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Encodes text; `add_special` adds BOS/EOS as the tokenizer config asks.
    ///
    /// Added tokens (special or not) are matched in the text as the reference slow
    /// tokenizer does, so text that spells `<|im_end|>` becomes that token; otherwise the
    /// model's pieces never produce an added id.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let spm = match &self.backend {
            Backend::Json(t) => {
                let enc = t
                    .encode(text, add_special)
                    .map_err(|e| ModelError::Encode(e.to_string()))?;
                return Ok(enc.get_ids().to_vec());
            }
            Backend::SentencePiece(spm) => spm,
        };
        let mut ids = Vec::new();
        if add_special && self.add_bos {
            ids.extend(self.bos_id);
        }
        let mut segment_start = 0;
        let mut pos = 0;
        let bytes = text.as_bytes();
        let mut skip_leading_ws = false;
        while pos < bytes.len() {
            let found = self.added.get(&bytes[pos]).and_then(|list| {
                list.iter()
                    .find(|a| text[pos..].starts_with(&a.content) && word_bounded(a, text, pos))
            });
            let Some(token) = found else {
                pos += 1;
                while pos < bytes.len() && !text.is_char_boundary(pos) {
                    pos += 1;
                }
                continue;
            };
            let mut segment = &text[segment_start..pos];
            if skip_leading_ws {
                segment = segment.trim_start();
            }
            if token.lstrip {
                segment = segment.trim_end();
            }
            ids.extend(spm.encode_segment(segment, segment_start == 0)?);
            ids.push(token.id);
            pos += token.content.len();
            segment_start = pos;
            skip_leading_ws = token.rstrip;
        }
        let mut segment = &text[segment_start..];
        if skip_leading_ws {
            segment = segment.trim_start();
        }
        ids.extend(spm.encode_segment(segment, segment_start == 0)?);
        if add_special && self.add_eos {
            ids.extend(self.eos_id);
        }
        Ok(ids)
    }

    /// Decodes ids to text; added tokens appear as their text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let spm = match &self.backend {
            Backend::Json(t) => {
                return t
                    .decode(ids, false)
                    .map_err(|e| ModelError::Encode(e.to_string()))
            }
            Backend::SentencePiece(spm) => spm,
        };
        let mut out = String::new();
        let mut bytes = Vec::new();
        let mut segment_is_first = true;
        for &id in ids {
            if let Some(content) = self.added_by_id.get(&id) {
                spm.flush_segment(&mut bytes, &mut out, segment_is_first);
                out.push_str(content);
                segment_is_first = false;
                continue;
            }
            // Ids past the tokenizer's vocabulary (a model's padding rows) decode to nothing,
            // as the fast tokenizers do.
            match spm.pieces.get(id as usize) {
                Some(PieceText::Text(t)) => bytes.extend_from_slice(t.as_bytes()),
                Some(PieceText::Byte(b)) => bytes.push(*b),
                None => {}
            }
        }
        spm.flush_segment(&mut bytes, &mut out, segment_is_first);
        Ok(out)
    }

    /// A streaming decoder that yields text as soon as it is final.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Whether an added token with `single_word` sits between non-word characters.
fn word_bounded(token: &Added, text: &str, pos: usize) -> bool {
    if !token.single_word {
        return true;
    }
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let before = text[..pos].chars().next_back().is_some_and(is_word);
    let after = text[pos + token.content.len()..]
        .chars()
        .next()
        .is_some_and(is_word);
    !before && !after
}

impl SpmBackend {
    fn encode_segment(&self, text: &str, at_text_start: bool) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let normalizer = if self.prefix_every_segment || at_text_start {
            &self.with_prefix
        } else {
            &self.without_prefix
        };
        let mut normalized = NormalizedString::from(text);
        normalizer
            .normalize(&mut normalized)
            .map_err(|e| ModelError::Encode(e.to_string()))?;
        if normalized.get().is_empty() {
            return Ok(Vec::new());
        }
        let tokens = self
            .model
            .tokenize(normalized.get())
            .map_err(|e| ModelError::Encode(e.to_string()))?;
        Ok(tokens.into_iter().map(|t| t.id).collect())
    }

    /// Appends the decoded bytes of a run of pieces, removing the dummy-prefix space.
    fn flush_segment(&self, bytes: &mut Vec<u8>, out: &mut String, is_first: bool) {
        let text = String::from_utf8_lossy(bytes);
        let strip = self.add_dummy_prefix && (self.prefix_every_segment || is_first);
        out.push_str(match strip {
            true => text.strip_prefix(' ').unwrap_or(&text),
            false => &text,
        });
        bytes.clear();
    }
}

/// `added_tokens_decoder` entries by ascending id, ids parsed.
fn sorted_added(config: &TokenizerConfig, path: &Path) -> Result<Vec<(u32, AddedTokenSpec)>> {
    let mut out = config
        .added_tokens_decoder
        .iter()
        .map(|(id, spec)| {
            id.parse::<u32>()
                .map(|id| (id, spec.clone()))
                .map_err(|_| ModelError::Config {
                    path: path.with_file_name("tokenizer_config.json"),
                    field: format!("added_tokens_decoder.{id}"),
                    message: "the key is not a token id".into(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

/// `<0xNN>` as its byte.
fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// The BPE model the reference converter builds: merges from every split of every piece
/// into two pieces of the vocabulary, ranked by the merged piece's score.
fn bpe_from_pieces(spm: &SpmModel) -> std::result::Result<BPE, String> {
    let vocab: tokenizers::models::bpe::Vocab = spm
        .pieces
        .iter()
        .enumerate()
        .map(|(id, p)| (p.piece.clone(), id as u32))
        .collect();
    let mut merges: Vec<(f32, u32, u32, u32, String, String)> = Vec::new();
    for (id, piece) in spm.pieces.iter().enumerate() {
        for (split, _) in piece.piece.char_indices().skip(1) {
            let (left, right) = piece.piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((
                    piece.score,
                    id as u32,
                    l,
                    r,
                    left.to_string(),
                    right.to_string(),
                ));
            }
        }
    }
    // Higher score first; ties keep vocabulary order, then the split's ids.
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let merges = merges.into_iter().map(|m| (m.4, m.5)).collect();
    let unk = spm.pieces[spm.unk_id as usize].piece.clone();
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(spm.byte_fallback)
        .build()
        .map_err(|e| e.to_string())
}

/// SentencePiece's normalization as `tokenizers` normalizers, with and without the dummy prefix:
/// the precompiled charsmap, extra-whitespace removal, the `▁` prefix, then `▁` for spaces.
fn spm_normalizers(
    spm: &SpmModel,
) -> std::result::Result<(NormalizerWrapper, NormalizerWrapper), String> {
    let mut base: Vec<NormalizerWrapper> = Vec::new();
    if !spm.precompiled_charsmap.is_empty() {
        let precompiled = Precompiled::from(&spm.precompiled_charsmap)
            .map_err(|e| format!("precompiled charsmap: {e}"))?;
        base.push(precompiled.into());
    }
    if spm.remove_extra_whitespaces {
        base.push(Strip::new(true, true).into());
        let collapse = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
            " ",
        )
        .map_err(|e| e.to_string())?;
        base.push(collapse.into());
    }
    let escape: Vec<NormalizerWrapper> = if spm.escape_whitespaces {
        vec![Replace::new(" ", "\u{2581}")
            .map_err(|e| e.to_string())?
            .into()]
    } else {
        Vec::new()
    };
    let mut with_prefix = base.clone();
    if spm.add_dummy_prefix {
        with_prefix.push(Prepend::new("\u{2581}".into()).into());
    }
    with_prefix.extend(escape.iter().cloned());
    let mut without_prefix = base;
    without_prefix.extend(escape);
    Ok((
        Sequence::new(with_prefix).into(),
        Sequence::new(without_prefix).into(),
    ))
}

/// Incremental detokenization: text is emitted once no later token can change it.
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream<'_> {
    /// Adds a token; returns the text that became final, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the bytes that finish it.
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(new) = now.strip_prefix(before.as_str()) else {
            return Ok(None);
        };
        let new = new.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(new))
    }

    /// The text not yet emitted (an unfinished character comes out as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        let rest = now.strip_prefix(before.as_str()).unwrap_or(&now);
        Ok((!rest.is_empty()).then(|| rest.to_string()))
    }
}
