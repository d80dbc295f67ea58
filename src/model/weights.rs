//! Hugging Face model directories in and out: `model.safetensors` (or a sharded index) with
//! HF tensor names and shapes, mapped to and from the flat internal parameter buffer.
//!
//! One table ([`hf_tensors`]) says where every HF tensor lives in the buffer; loading and
//! saving both walk it, so the name mapping exists exactly once. Every HF tensor maps to one
//! contiguous range of the buffer because the internal packings (q/k/v into `qkv`, gate/up
//! into `fc`) stack along the first (output) dimension; GPT-2's Conv1D weights additionally
//! need a transpose.

use super::config::{Config, Family, Head};
use super::layout::Layout;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// File name of a single-file checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index (`weight_map`: tensor name → shard file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Tokenizer-side files `copy_tokenizer_files` carries over; `chat_template.jinja` is where
/// transformers >= 4.43 keeps the chat template instead of `tokenizer_config.json`.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// One tensor of the Hugging Face checkpoint and where it lives in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfTensor {
    /// HF name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// HF shape as stored in the file.
    pub shape: Vec<usize>,
    /// Elements of the flat buffer holding this tensor (a whole internal parameter or a
    /// row block of a packed one).
    pub range: Range<usize>,
    /// GPT-2 Conv1D: the file holds `[in, out]`, the buffer `[out, in]`.
    pub transpose: bool,
}

/// Element type of a saved checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    /// Exact: a save/load round trip is bitwise.
    F32,
    /// Half the size; what most HF checkpoints ship as.
    Bf16,
}

impl SaveDtype {
    /// The `dtype`/`torch_dtype` string of `config.json`.
    pub fn config_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        }
    }
}

/// The body's name prefix in the HF checkpoint (`GPT2LMHeadModel` keeps the body under
/// `transformer.`, `*ForCausalLM` under `model.`).
fn body_prefix(family: Family) -> &'static str {
    match family {
        Family::Gpt2 => "transformer.",
        Family::Llama | Family::Qwen2 => "model.",
    }
}

/// The mapping between HF tensors and the flat buffer, in a fixed order; the single source of
/// truth for both [`load_params`] and [`save_model`]. The ranges cover `0..layout.total`
/// exactly once.
pub fn hf_tensors(cfg: &Config, layout: &Layout) -> Vec<HfTensor> {
    let c = cfg.hidden_size;
    let hd = cfg.head_dim;
    let q = cfg.n_head * hd;
    let kv = cfg.n_kv_head * hd;
    let inter = cfg.intermediate_size;
    let pre = body_prefix(cfg.family);
    let mut t = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, range: Range<usize>, transpose: bool| {
        debug_assert_eq!(shape.iter().product::<usize>(), range.len(), "{name}");
        t.push(HfTensor {
            name,
            shape,
            range,
            transpose,
        });
    };
    // Splits a packed range into row blocks of the given row counts, each `cols` wide.
    let rows = |r: &Range<usize>, cols: usize, counts: &[usize]| -> Vec<Range<usize>> {
        let mut start = r.start;
        counts
            .iter()
            .map(|&n| {
                let s = start;
                start += n * cols;
                s..start
            })
            .collect()
    };
    match cfg.family {
        Family::Gpt2 => {
            add(
                format!("{pre}wte.weight"),
                vec![cfg.vocab_size, c],
                layout.embed.clone(),
                false,
            );
            if let Some(r) = &layout.pos_embed {
                add(
                    format!("{pre}wpe.weight"),
                    vec![cfg.max_position, c],
                    r.clone(),
                    false,
                );
            }
            for (l, b) in layout.blocks.iter().enumerate() {
                let p = |s: &str| format!("{pre}h.{l}.{s}");
                add(p("ln_1.weight"), vec![c], b.ln1_w.clone(), false);
                if let Some(r) = &b.ln1_b {
                    add(p("ln_1.bias"), vec![c], r.clone(), false);
                }
                // c_attn is already q, k, v packed along its output dimension.
                add(
                    p("attn.c_attn.weight"),
                    vec![c, q + 2 * kv],
                    b.qkv_w.clone(),
                    true,
                );
                if let Some(r) = &b.qkv_b {
                    add(p("attn.c_attn.bias"), vec![q + 2 * kv], r.clone(), false);
                }
                add(p("attn.c_proj.weight"), vec![q, c], b.o_w.clone(), true);
                if let Some(r) = &b.o_b {
                    add(p("attn.c_proj.bias"), vec![c], r.clone(), false);
                }
                add(p("ln_2.weight"), vec![c], b.ln2_w.clone(), false);
                if let Some(r) = &b.ln2_b {
                    add(p("ln_2.bias"), vec![c], r.clone(), false);
                }
                add(p("mlp.c_fc.weight"), vec![c, inter], b.fc_w.clone(), true);
                if let Some(r) = &b.fc_b {
                    add(p("mlp.c_fc.bias"), vec![inter], r.clone(), false);
                }
                add(
                    p("mlp.c_proj.weight"),
                    vec![inter, c],
                    b.proj_w.clone(),
                    true,
                );
                if let Some(r) = &b.proj_b {
                    add(p("mlp.c_proj.bias"), vec![c], r.clone(), false);
                }
            }
            add(
                format!("{pre}ln_f.weight"),
                vec![c],
                layout.lnf_w.clone(),
                false,
            );
            if let Some(r) = &layout.lnf_b {
                add(format!("{pre}ln_f.bias"), vec![c], r.clone(), false);
            }
        }
        Family::Llama | Family::Qwen2 => {
            add(
                format!("{pre}embed_tokens.weight"),
                vec![cfg.vocab_size, c],
                layout.embed.clone(),
                false,
            );
            for (l, b) in layout.blocks.iter().enumerate() {
                let p = |s: &str| format!("{pre}layers.{l}.{s}");
                add(p("input_layernorm.weight"), vec![c], b.ln1_w.clone(), false);
                let qkv = rows(&b.qkv_w, c, &[q, kv, kv]);
                add(
                    p("self_attn.q_proj.weight"),
                    vec![q, c],
                    qkv[0].clone(),
                    false,
                );
                add(
                    p("self_attn.k_proj.weight"),
                    vec![kv, c],
                    qkv[1].clone(),
                    false,
                );
                add(
                    p("self_attn.v_proj.weight"),
                    vec![kv, c],
                    qkv[2].clone(),
                    false,
                );
                if let Some(r) = &b.qkv_b {
                    let qkv = rows(r, 1, &[q, kv, kv]);
                    add(p("self_attn.q_proj.bias"), vec![q], qkv[0].clone(), false);
                    add(p("self_attn.k_proj.bias"), vec![kv], qkv[1].clone(), false);
                    add(p("self_attn.v_proj.bias"), vec![kv], qkv[2].clone(), false);
                }
                add(
                    p("self_attn.o_proj.weight"),
                    vec![c, q],
                    b.o_w.clone(),
                    false,
                );
                if let Some(r) = &b.o_b {
                    add(p("self_attn.o_proj.bias"), vec![c], r.clone(), false);
                }
                add(
                    p("post_attention_layernorm.weight"),
                    vec![c],
                    b.ln2_w.clone(),
                    false,
                );
                // Gate first, then up: the order the fused SwiGLU kernel reads them in.
                let fc = rows(&b.fc_w, c, &[inter, inter]);
                add(
                    p("mlp.gate_proj.weight"),
                    vec![inter, c],
                    fc[0].clone(),
                    false,
                );
                add(
                    p("mlp.up_proj.weight"),
                    vec![inter, c],
                    fc[1].clone(),
                    false,
                );
                if let Some(r) = &b.fc_b {
                    let fc = rows(r, 1, &[inter, inter]);
                    add(p("mlp.gate_proj.bias"), vec![inter], fc[0].clone(), false);
                    add(p("mlp.up_proj.bias"), vec![inter], fc[1].clone(), false);
                }
                add(
                    p("mlp.down_proj.weight"),
                    vec![c, inter],
                    b.proj_w.clone(),
                    false,
                );
                if let Some(r) = &b.proj_b {
                    add(p("mlp.down_proj.bias"), vec![c], r.clone(), false);
                }
            }
            add(
                format!("{pre}norm.weight"),
                vec![c],
                layout.lnf_w.clone(),
                false,
            );
        }
    }
    match cfg.head {
        Head::Lm => {
            // Tied heads are absent from HF files (transformers drops the shared tensor).
            if let Some(r) = &layout.lm_head {
                add(
                    "lm_head.weight".into(),
                    vec![cfg.vocab_size, c],
                    r.clone(),
                    false,
                );
            }
        }
        Head::Score => {
            if let Some(r) = &layout.score {
                add("score.weight".into(), vec![1, c], r.clone(), false);
            }
        }
    }
    t
}

/// Header-only view of the tensors a safetensors file holds: name → (dtype, shape), without
/// the data; for tests and for tools that inspect a directory before loading it.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, (Dtype, Vec<usize>)>> {
    let bytes = read_file(path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| st_err(path, e))?;
    Ok(meta
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype, v.shape.clone())))
        .collect())
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn st_err(path: &Path, e: safetensors::SafeTensorError) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Which file holds each tensor: one file, or the shards of an index. `model.safetensors`
/// wins when both exist, as in transformers.
enum Source {
    Single(PathBuf),
    Sharded {
        index: PathBuf,
        weight_map: HashMap<String, String>,
    },
}

impl Source {
    fn open(dir: &Path) -> Result<Source> {
        let single = dir.join(WEIGHTS_FILE);
        if single.is_file() {
            return Ok(Source::Single(single));
        }
        let index = dir.join(INDEX_FILE);
        if !index.is_file() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
                    ),
                ),
            ));
        }
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json_err = |msg: String| Error::Json {
            path: index.clone(),
            msg,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| json_err(e.to_string()))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| json_err("no `weight_map` object".into()))?;
        let mut weight_map = HashMap::with_capacity(map.len());
        for (k, f) in map {
            let f = f
                .as_str()
                .ok_or_else(|| json_err(format!("weight_map[`{k}`] is not a file name")))?;
            // Shards must sit beside the index; a path that escapes the directory is refused.
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(json_err(format!(
                    "weight_map[`{k}`] = `{f}` is not a plain file name"
                )));
            }
            weight_map.insert(k.clone(), f.to_string());
        }
        Ok(Source::Sharded { index, weight_map })
    }

    /// The file holding `name`, if the checkpoint lists it.
    fn file_of(&self, dir: &Path, name: &str) -> Option<PathBuf> {
        match self {
            Source::Single(p) => Some(p.clone()),
            Source::Sharded { weight_map, .. } => weight_map.get(name).map(|f| dir.join(f)),
        }
    }

    /// Whether the checkpoint lists `name` (for a single file, known only once it is open).
    fn has(&self, name: &str, single: Option<&SafeTensors>) -> bool {
        match self {
            Source::Single(_) => single.is_some_and(|st| st.tensor(name).is_ok()),
            Source::Sharded { weight_map, .. } => weight_map.contains_key(name),
        }
    }

    /// The path a missing tensor is reported against.
    fn path(&self) -> &Path {
        match self {
            Source::Single(p) => p,
            Source::Sharded { index, .. } => index,
        }
    }
}

/// Reads a Hugging Face checkpoint (`model.safetensors`, or `model.safetensors.index.json`
/// and its shards; F32, BF16 or F16) into a flat buffer of `layout.total` f32s laid out as
/// `layout` says. Tensors the model does not use (a tied `lm_head.weight`, GPT-2's attention
/// mask buffers) are ignored.
pub fn load_params(dir: &Path, cfg: &Config, layout: &Layout) -> Result<Vec<f32>> {
    let table = hf_tensors(cfg, layout);
    let source = Source::open(dir)?;
    let mut params = vec![0f32; layout.total];

    // Resolve each table entry to the name the file uses. A bare `GPT2Model` /
    // `LlamaModel` checkpoint stores the body without its `transformer.` / `model.` prefix;
    // the choice is made once per checkpoint so a file cannot mix the two spellings.
    let single_bytes = match &source {
        Source::Single(p) => Some(read_file(p)?),
        Source::Sharded { .. } => None,
    };
    let single = match (&source, &single_bytes) {
        (Source::Single(p), Some(b)) => {
            Some(SafeTensors::deserialize(b).map_err(|e| st_err(p, e))?)
        }
        _ => None,
    };
    let prefix = body_prefix(cfg.family);
    let probe = &table[0].name; // the embedding, always present and always prefixed
    let strip = !source.has(probe, single.as_ref())
        && source.has(probe.strip_prefix(prefix).unwrap_or(probe), single.as_ref());
    let file_name = |name: &str| -> String {
        match name.strip_prefix(prefix) {
            Some(rest) if strip => rest.to_string(),
            _ => name.to_string(),
        }
    };

    // Group the work by file so each shard is read once.
    let mut by_file: BTreeMap<PathBuf, Vec<(&HfTensor, String)>> = BTreeMap::new();
    for t in &table {
        let name = file_name(&t.name);
        let file = source
            .file_of(dir, &name)
            .ok_or_else(|| Error::MissingTensor {
                path: source.path().to_path_buf(),
                name: name.clone(),
            })?;
        by_file.entry(file).or_default().push((t, name));
    }

    for (file, items) in by_file {
        let shard_bytes;
        let shard;
        let st = match &single {
            Some(st) => st,
            None => {
                shard_bytes = read_file(&file)?;
                shard = SafeTensors::deserialize(&shard_bytes).map_err(|e| st_err(&file, e))?;
                &shard
            }
        };
        for (t, name) in items {
            let view = st.tensor(&name).map_err(|_| Error::MissingTensor {
                path: file.clone(),
                name: name.clone(),
            })?;
            if view.shape() != t.shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    path: file.clone(),
                    name,
                    expected: t.shape.clone(),
                    found: view.shape().to_vec(),
                });
            }
            let dst = &mut params[t.range.clone()];
            let values = to_f32(&file, &name, view.dtype(), view.data())?;
            if t.transpose {
                // File [rows = in, cols = out] → buffer [out, in].
                let (rows, cols) = (t.shape[0], t.shape[1]);
                for (i, row) in values.chunks_exact(cols).enumerate() {
                    for (o, &x) in row.iter().enumerate() {
                        dst[o * rows + i] = x;
                    }
                }
            } else {
                dst.copy_from_slice(&values);
            }
        }
    }
    Ok(params)
}

/// Decodes little-endian tensor bytes to f32. Byte-wise, so the buffer needs no alignment.
fn to_f32(path: &Path, name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Unsupported(format!(
                "{}: tensor `{name}` has dtype {other:?} (only F32, BF16 and F16 are read)",
                path.display()
            )))
        }
    })
}

/// A tensor to be written, converted lazily so a save never holds a second copy of the model.
struct OutTensor<'a> {
    src: &'a [f32],
    shape: Vec<usize>,
    transpose: bool,
    dtype: SaveDtype,
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::Bf16 => Dtype::BF16,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let hf_order: Cow<[f32]> = if self.transpose {
            // Buffer [out, in] → file [rows = in, cols = out].
            let (rows, cols) = (self.shape[0], self.shape[1]);
            let mut v = vec![0f32; self.src.len()];
            for (i, row) in v.chunks_exact_mut(cols).enumerate() {
                for (o, x) in row.iter_mut().enumerate() {
                    *x = self.src[o * rows + i];
                }
            }
            Cow::Owned(v)
        } else {
            Cow::Borrowed(self.src)
        };
        let bytes = match self.dtype {
            SaveDtype::F32 => hf_order.iter().flat_map(|x| x.to_le_bytes()).collect(),
            SaveDtype::Bf16 => hf_order
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        };
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.src.len()
            * match self.dtype {
                SaveDtype::F32 => 4,
                SaveDtype::Bf16 => 2,
            }
    }
}

/// Writes a Hugging Face model directory that transformers loads: `config.json` (with
/// `dtype` set to match) and `model.safetensors` with HF names and shapes. Each file is
/// written under a temporary name, synced and renamed, so a crash never leaves a torn
/// checkpoint. The tokenizer is not written here (see [`copy_tokenizer_files`]).
pub fn save_model(
    dir: &Path,
    cfg: &Config,
    layout: &Layout,
    params: &[f32],
    dtype: SaveDtype,
) -> Result<()> {
    if params.len() != layout.total {
        return Err(Error::Invalid(format!(
            "save_model: parameter buffer has {} elements, the layout {}",
            params.len(),
            layout.total
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

    let tensors: Vec<(String, OutTensor)> = hf_tensors(cfg, layout)
        .into_iter()
        .map(|t| {
            let out = OutTensor {
                src: &params[t.range.clone()],
                shape: t.shape,
                transpose: t.transpose,
                dtype,
            };
            (t.name, out)
        })
        .collect();
    // transformers refuses safetensors files whose metadata lacks format "pt".
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.join(WEIGHTS_FILE);
    write_atomic_with(&path, |tmp| {
        safetensors::serialize_to_file(tensors, Some(meta), tmp).map_err(|e| st_err(tmp, e))
    })?;

    let mut v = cfg.to_json();
    if let Some(o) = v.as_object_mut() {
        o.insert("dtype".into(), dtype.config_name().into());
        o.insert("torch_dtype".into(), dtype.config_name().into());
    }
    let text = serde_json::to_string_pretty(&v).expect("a JSON value always serialises");
    write_atomic(&dir.join("config.json"), text.as_bytes())
}

/// Copies the tokenizer-side files ([`TOKENIZER_FILES`]) that exist in `src` to `dst`, so a
/// saved checkpoint is a complete model directory. Missing files are skipped: not every
/// model ships all of them.
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if !from.is_file() {
            continue;
        }
        let bytes = read_file(&from)?;
        write_atomic(&dst.join(name), &bytes)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: temporary file in the same directory, fsync,
/// rename, then fsync of the directory so the rename itself survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Like [`write_atomic`], with `write` producing the temporary file's contents.
fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp)
        .and_then(|()| {
            let f = std::fs::File::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        // Leave no half-written temporary behind; the original file is untouched.
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Directory fsync is best effort: some filesystems refuse it, and the data is already safe.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
