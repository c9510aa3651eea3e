//! A reader for SentencePiece's `tokenizer.model` (a serialized `ModelProto`).
//!
//! Only the fields a tokenizer needs are kept; everything else is skipped by wire type,
//! so models written by newer SentencePiece versions still load.

/// The kind of a piece, as SentencePiece numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece.
    Normal,
    /// The unknown piece.
    Unknown,
    /// A control symbol such as `<s>`; never matched in text.
    Control,
    /// A user-defined symbol, matched atomically in text.
    UserDefined,
    /// A piece the model never produces.
    Unused,
    /// A byte-fallback piece `<0xNN>`.
    Byte,
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Its text, with `▁` for spaces.
    pub piece: String,
    /// Its score (log probability for Unigram, merge priority for BPE).
    pub score: f32,
    /// Its kind.
    pub kind: PieceType,
}

/// The segmentation algorithm of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmModelType {
    /// Unigram language model.
    Unigram,
    /// Byte-pair encoding.
    Bpe,
    /// Whitespace-split words.
    Word,
    /// Single characters.
    Char,
}

/// The parts of a `ModelProto` a tokenizer needs, with SentencePiece's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SpmModel {
    /// The vocabulary, by id.
    pub pieces: Vec<Piece>,
    /// `trainer_spec.model_type`.
    pub model_type: SpmModelType,
    /// `trainer_spec.byte_fallback`.
    pub byte_fallback: bool,
    /// `trainer_spec.unk_id`.
    pub unk_id: u32,
    /// `normalizer_spec.name`.
    pub normalizer_name: String,
    /// `normalizer_spec.precompiled_charsmap`.
    pub precompiled_charsmap: Vec<u8>,
    /// `normalizer_spec.add_dummy_prefix`.
    pub add_dummy_prefix: bool,
    /// `normalizer_spec.remove_extra_whitespaces`.
    pub remove_extra_whitespaces: bool,
    /// `normalizer_spec.escape_whitespaces`.
    pub escape_whitespaces: bool,
}

/// Why a `tokenizer.model` could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SpmError(String);

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
    Fixed64,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, SpmError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .data
                .get(self.pos)
                .ok_or_else(|| SpmError(format!("truncated varint at byte {}", self.pos)))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(SpmError(format!("varint too long at byte {}", self.pos)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SpmError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| {
            SpmError(format!(
                "field of {n} bytes at byte {} runs past the end ({} bytes)",
                self.pos,
                self.data.len()
            ))
        })?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// The next (field number, value), or None at the end.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, SpmError> {
        if self.pos == self.data.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| SpmError("length overflows".into()))?;
                Field::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            wire => {
                return Err(SpmError(format!(
                    "unsupported wire type {wire} at byte {}",
                    self.pos
                )))
            }
        };
        Ok(Some((key >> 3, field)))
    }
}

fn string(bytes: &[u8], what: &str) -> Result<String, SpmError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| SpmError(format!("{what} is not UTF-8")))
}

fn parse_piece(data: &[u8]) -> Result<Piece, SpmError> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut r = Reader::new(data);
    while let Some((number, field)) = r.next()? {
        match (number, field) {
            (1, Field::Bytes(b)) => piece.piece = string(b, "a piece")?,
            (2, Field::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Field::Varint(v)) => {
                piece.kind = match v {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    other => return Err(SpmError(format!("unknown piece type {other}"))),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

impl SpmModel {
    /// Parses a serialized `ModelProto`.
    pub fn parse(data: &[u8]) -> Result<Self, SpmError> {
        let mut model = SpmModel {
            pieces: Vec::new(),
            model_type: SpmModelType::Unigram,
            byte_fallback: false,
            unk_id: 0,
            normalizer_name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut r = Reader::new(data);
        while let Some((number, field)) = r.next()? {
            match (number, field) {
                (1, Field::Bytes(b)) => model.pieces.push(parse_piece(b)?),
                (2, Field::Bytes(b)) => model.read_trainer_spec(b)?,
                (3, Field::Bytes(b)) => model.read_normalizer_spec(b)?,
                (1..=3, _) => {
                    return Err(SpmError(format!("field {number} has the wrong wire type")))
                }
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err(SpmError("no vocabulary pieces".into()));
        }
        if model.unk_id as usize >= model.pieces.len() {
            return Err(SpmError(format!(
                "unk_id {} is outside the vocabulary of {} pieces",
                model.unk_id,
                model.pieces.len()
            )));
        }
        Ok(model)
    }

    fn read_trainer_spec(&mut self, data: &[u8]) -> Result<(), SpmError> {
        let mut r = Reader::new(data);
        while let Some((number, field)) = r.next()? {
            match (number, field) {
                (3, Field::Varint(v)) => {
                    self.model_type = match v {
                        1 => SpmModelType::Unigram,
                        2 => SpmModelType::Bpe,
                        3 => SpmModelType::Word,
                        4 => SpmModelType::Char,
                        other => return Err(SpmError(format!("unknown model_type {other}"))),
                    }
                }
                (35, Field::Varint(v)) => self.byte_fallback = v != 0,
                (40, Field::Varint(v)) => {
                    self.unk_id =
                        u32::try_from(v).map_err(|_| SpmError(format!("unk_id {v} is invalid")))?
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn read_normalizer_spec(&mut self, data: &[u8]) -> Result<(), SpmError> {
        let mut r = Reader::new(data);
        while let Some((number, field)) = r.next()? {
            match (number, field) {
                (1, Field::Bytes(b)) => self.normalizer_name = string(b, "normalizer name")?,
                (2, Field::Bytes(b)) => self.precompiled_charsmap = b.to_vec(),
                (3, Field::Varint(v)) => self.add_dummy_prefix = v != 0,
                (4, Field::Varint(v)) => self.remove_extra_whitespaces = v != 0,
                (5, Field::Varint(v)) => self.escape_whitespaces = v != 0,
                _ => {}
            }
        }
        Ok(())
    }
}
