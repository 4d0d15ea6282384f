//! A GGUF v3 writer (llama.cpp's model file format), written from the format description in
//! llama.cpp's `gguf-py` (`gguf_writer.py`, `constants.py`).
//!
//! Layout, all integers little-endian:
//! ```text
//! magic "GGUF" (u32 0x46554747) | version u32 = 3 | tensor_count u64 | kv_count u64
//! kv_count × { key: string | value_type u32 | value }
//! tensor_count × { name: string | n_dims u32 | ne[0..n_dims] u64 | ggml_type u32 | offset u64 }
//! zero padding to `general.alignment` (32 unless the metadata says otherwise)
//! data: each tensor at its offset (relative to the data start), zero-padded to the alignment
//! ```
//! A string is `len u64` + UTF-8 bytes; an array is `elem_type u32 | count u64 | elements`.
//! `ne` lists the dimensions innermost first (the reverse of PyTorch's shape): a `[rows, cols]`
//! matrix is written `ne = [cols, rows]`.
//!
//! Offsets follow from the tensor sizes, so the header is written first and the data then
//! streamed one tensor at a time from a callback. The file is written under a temporary name
//! next to the output and renamed into place once complete (and synced).

use super::encode::GgmlType;
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
pub const GGUF_VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: usize = 32;

/// A typed metadata value (GGUF value types 0..=12).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A homogeneous metadata array.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    Str(Vec<String>),
    F32(Vec<f32>),
    I32(Vec<i32>),
    U32(Vec<u32>),
}

impl Value {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend(v.to_le_bytes()),
            Value::U16(v) => out.extend(v.to_le_bytes()),
            Value::I16(v) => out.extend(v.to_le_bytes()),
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::I32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::Str(s) => put_str(out, s),
            Value::U64(v) => out.extend(v.to_le_bytes()),
            Value::I64(v) => out.extend(v.to_le_bytes()),
            Value::F64(v) => out.extend(v.to_le_bytes()),
            Value::Array(a) => a.put(out),
        }
    }
}

impl Array {
    fn put(&self, out: &mut Vec<u8>) {
        fn head(out: &mut Vec<u8>, ty: u32, n: usize) {
            out.extend(ty.to_le_bytes());
            out.extend((n as u64).to_le_bytes());
        }
        match self {
            Array::Str(v) => {
                head(out, 8, v.len());
                v.iter().for_each(|s| put_str(out, s));
            }
            Array::F32(v) => {
                head(out, 6, v.len());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            Array::I32(v) => {
                head(out, 5, v.len());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            Array::U32(v) => {
                head(out, 4, v.len());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// One tensor of the file: its name, PyTorch-order shape and storage type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Outermost first, as in PyTorch (`[rows, cols]`); written reversed.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Bytes of the tensor's data (without padding).
    pub fn nbytes(&self) -> usize {
        self.ty.nbytes(self.shape.iter().product())
    }
}

/// `n` rounded up to a multiple of `align`.
pub fn pad_to(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

/// Metadata and tensor list of a GGUF file, written by [`GgufWriter::write`].
#[derive(Debug, Default)]
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a metadata key.
    pub fn add(&mut self, key: &str, value: Value) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.kv.push((key.to_string(), value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Declares a tensor; data comes from the callback of [`GgufWriter::write`], in this order.
    pub fn add_tensor(&mut self, info: TensorInfo) -> Result<()> {
        if self.tensors.iter().any(|t| t.name == info.name) {
            return Err(Error::InvalidArg(format!(
                "gguf: duplicate tensor {}",
                info.name
            )));
        }
        info.ty.check_shape(&info.name, &info.shape)?;
        self.tensors.push(info);
        Ok(())
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The data alignment: `general.alignment` if set, else 32.
    pub fn alignment(&self) -> usize {
        match self.get("general.alignment") {
            Some(Value::U32(a)) if *a > 0 => *a as usize,
            _ => DEFAULT_ALIGNMENT,
        }
    }

    /// Header, metadata and tensor infos, padded to the alignment: everything before the data.
    pub fn header_bytes(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut out = Vec::new();
        out.extend(GGUF_MAGIC.to_le_bytes());
        out.extend(GGUF_VERSION.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            v.put(&mut out);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                out.extend((d as u64).to_le_bytes());
            }
            out.extend(t.ty.id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += pad_to(t.nbytes(), align);
        }
        out.resize(pad_to(out.len(), align), 0);
        out
    }

    /// Writes the file to `path` (via a temporary file renamed at the end), asking `produce`
    /// for each tensor's bytes in declaration order. Returns the file size.
    pub fn write(
        &self,
        path: &Path,
        mut produce: impl FnMut(usize, &TensorInfo) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let tmp = tmp_path(path)?;
        let result = self.write_to(&tmp, &mut produce);
        match result {
            Ok(n) => {
                std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
                Ok(n)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn write_to(
        &self,
        tmp: &Path,
        produce: &mut impl FnMut(usize, &TensorInfo) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let align = self.alignment();
        let file = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let io = |e| Error::io(tmp, e);
        let header = self.header_bytes();
        w.write_all(&header).map_err(io)?;
        let mut total = header.len() as u64;
        for (i, t) in self.tensors.iter().enumerate() {
            let data = produce(i, t)?;
            if data.len() != t.nbytes() {
                return Err(Error::BadTensor {
                    path: tmp.to_path_buf(),
                    name: t.name.clone(),
                    msg: format!(
                        "produced {} bytes, {:?} {:?} needs {}",
                        data.len(),
                        t.ty,
                        t.shape,
                        t.nbytes()
                    ),
                });
            }
            let padded = pad_to(data.len(), align);
            w.write_all(&data).map_err(io)?;
            w.write_all(&vec![0u8; padded - data.len()]).map_err(io)?;
            total += padded as u64;
        }
        let file = w.into_inner().map_err(|e| Error::io(tmp, e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(total)
    }
}

/// `<output>.tmp-<pid>` in the output's folder.
fn tmp_path(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::InvalidArg(format!("output {} has no file name", out.display())))?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".tmp-{}", std::process::id()));
    Ok(out.with_file_name(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], i: usize) -> u64 {
        u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
    }

    /// A hand-built file checked byte by byte against the layout in the module docs.
    #[test]
    fn byte_layout_of_a_tiny_file() {
        let mut g = GgufWriter::new();
        g.add("a", Value::U32(7));
        g.add("s", Value::Array(Array::Str(vec!["x".into(), "yz".into()])));
        g.add_tensor(TensorInfo {
            name: "t".into(),
            shape: vec![2, 3],
            ty: GgmlType::F32,
        })
        .unwrap();
        g.add_tensor(TensorInfo {
            name: "u".into(),
            shape: vec![1],
            ty: GgmlType::F32,
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        let n = g
            .write(&path, |i, _| {
                Ok(if i == 0 {
                    (0..6).flat_map(|x| (x as f32).to_le_bytes()).collect()
                } else {
                    9f32.to_le_bytes().to_vec()
                })
            })
            .unwrap();
        let b = std::fs::read(&path).unwrap();
        assert_eq!(n as usize, b.len());
        assert_eq!(&b[0..4], b"GGUF");
        assert_eq!(u32_at(&b, 4), 3);
        assert_eq!(u64_at(&b, 8), 2); // tensors
        assert_eq!(u64_at(&b, 16), 2); // kvs
        let mut p = 24;
        // kv "a": u32 7
        assert_eq!(u64_at(&b, p), 1);
        assert_eq!(b[p + 8], b'a');
        assert_eq!(u32_at(&b, p + 9), 4);
        assert_eq!(u32_at(&b, p + 13), 7);
        p += 17;
        // kv "s": array of 2 strings
        assert_eq!(u64_at(&b, p), 1);
        assert_eq!(b[p + 8], b's');
        assert_eq!(u32_at(&b, p + 9), 9);
        assert_eq!(u32_at(&b, p + 13), 8);
        assert_eq!(u64_at(&b, p + 17), 2);
        assert_eq!(u64_at(&b, p + 25), 1);
        assert_eq!(b[p + 33], b'x');
        assert_eq!(u64_at(&b, p + 34), 2);
        assert_eq!(&b[p + 42..p + 44], b"yz");
        p += 44;
        // tensor info "t": 2 dims, ne = [3, 2], F32, offset 0
        assert_eq!(u64_at(&b, p), 1);
        assert_eq!(b[p + 8], b't');
        assert_eq!(u32_at(&b, p + 9), 2);
        assert_eq!(u64_at(&b, p + 13), 3);
        assert_eq!(u64_at(&b, p + 21), 2);
        assert_eq!(u32_at(&b, p + 29), 0);
        assert_eq!(u64_at(&b, p + 33), 0);
        p += 41;
        // tensor info "u": 24 bytes of "t" padded to 32
        assert_eq!(u32_at(&b, p + 9), 1);
        assert_eq!(u64_at(&b, p + 13), 1);
        assert_eq!(u64_at(&b, p + 25), 32);
        p += 33;
        let data = pad_to(p, 32);
        assert!(b[p..data].iter().all(|&x| x == 0));
        let f = |i: usize| f32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        assert_eq!(
            (0..6).map(|k| f(data + 4 * k)).collect::<Vec<_>>(),
            [0., 1., 2., 3., 4., 5.]
        );
        assert_eq!(f(data + 32), 9.0);
        assert_eq!(b.len(), data + 64);
        // The temporary file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_short_tensor_fails_and_leaves_nothing() {
        let mut g = GgufWriter::new();
        g.add_tensor(TensorInfo {
            name: "t".into(),
            shape: vec![4],
            ty: GgmlType::F32,
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        let err = g.write(&path, |_, _| Ok(vec![0u8; 4])).unwrap_err();
        assert!(err.to_string().contains("needs 16"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
