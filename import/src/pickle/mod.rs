//! A lenient reader for the pickle streams inside PyTorch checkpoints.
//!
//! burn's PyTorch reader refuses Lightning checkpoints because their `callbacks` dict is
//! keyed by classes. This reader builds a plain value tree instead: any value may be a dict
//! key, unknown classes stay symbolic ([`Value::Global`], [`Value::Call`]) and nothing is
//! executed. Tensor data is not in the pickle; persistent ids point into the zip archive.
//!
//! Streams are untrusted: values nest at most [`MAX_DEPTH`] levels, everything decoded (the
//! copies the memo and DUP make included) is charged against [`MAX_MEMORY`], and every length
//! read from the stream is checked against the bytes left before anything is allocated.
//!
//! [`read`] runs the pickle machine (`machine`, the opcodes), which builds values with the
//! helpers of `values` and charges what it decodes and copies through `budget`.

mod budget;
mod machine;
mod values;

use machine::Machine;
use values::malformed;

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// An integer too large for 64 bits (kept as its little-endian bytes).
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A text string.
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A list (or a set, which is read as a list).
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A dict in insertion order; keys may be any value.
    Dict(Vec<(Value, Value)>),
    /// A reference to a class or function, `module.name`.
    Global {
        /// Module path.
        module: String,
        /// Attribute name.
        name: String,
    },
    /// The result of calling `func(*args)` (REDUCE / NEWOBJ), with any BUILD state.
    Call {
        /// What was called.
        func: Box<Value>,
        /// Its arguments.
        args: Box<Value>,
        /// State set by BUILD, if any.
        state: Option<Box<Value>>,
    },
    /// A persistent id (PyTorch uses these for tensor storages).
    PersistentId(Box<Value>),
}

/// Deepest nesting of containers, calls and persistent ids a stream may build. Python's own
/// pickler stops near its recursion limit of 1000, and much deeper values would overflow the
/// stack when dropped or copied.
pub const MAX_DEPTH: u32 = 1000;

/// Most memory, in bytes, the values decoded from one stream may take, copies made for the
/// memo and DUP included. A Lightning checkpoint's pickle decodes to a few MiB; the limit stops
/// a small stream that copies a nested value over and over from growing without bound.
pub const MAX_MEMORY: usize = 256 << 20;

/// What one value costs against [`MAX_MEMORY`], besides the bytes of its strings: the value
/// and its depth entry.
const NODE: usize = size_of::<Value>() + size_of::<u32>();

/// Why a pickle stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// The stream ended inside an opcode.
    #[error("pickle stream ends early at byte {0}")]
    Truncated(usize),
    /// A length read from the stream runs past its end.
    #[error(
        "pickle opcode at byte {at} declares {declared} bytes, but only {remaining} remain in the stream"
    )]
    Length {
        /// Position of the opcode.
        at: usize,
        /// The length it declares.
        declared: u64,
        /// Bytes left after the length field.
        remaining: usize,
    },
    /// Values nest deeper than [`MAX_DEPTH`].
    #[error("pickle nests values deeper than {MAX_DEPTH} levels at byte {at}; refused")]
    TooDeep {
        /// Position of the opcode.
        at: usize,
    },
    /// Decoding would take more than [`MAX_MEMORY`].
    #[error(
        "pickle values would take more than {} MiB at byte {at} (memo and DUP copies included); refused",
        MAX_MEMORY >> 20
    )]
    TooLarge {
        /// Position of the opcode.
        at: usize,
    },
    /// An opcode this reader does not handle.
    #[error("unsupported pickle opcode 0x{op:02x} at byte {at}")]
    Unsupported {
        /// The opcode byte.
        op: u8,
        /// Its position.
        at: usize,
    },
    /// The stream is not a valid pickle.
    #[error("malformed pickle at byte {at}: {reason}")]
    Malformed {
        /// Position of the opcode.
        at: usize,
        /// What is wrong.
        reason: String,
    },
}

impl Value {
    /// The string inside a `Str`, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer inside an `Int`, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Looks a string key up in a dict value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Whether this is a `Global` naming `module.name`.
    pub fn is_global(&self, module: &str, name: &str) -> bool {
        matches!(self, Value::Global { module: m, name: n } if m == module && n == name)
    }
}

/// Reads one pickle stream into a [`Value`]. Values nest at most [`MAX_DEPTH`] levels and
/// take at most about [`MAX_MEMORY`] bytes, or the stream is refused.
///
/// The machine runs on a thread of its own with a [`STACK_BYTES`] stack: copying a value
/// [`MAX_DEPTH`] levels deep recurses that deep, which unoptimized code and small thread
/// stacks (a test thread's 2 MiB) would not hold. Its memo and stack are dropped there too.
pub fn read(bytes: &[u8]) -> Result<Value, PickleError> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("pickle".into())
            .stack_size(STACK_BYTES)
            .spawn_scoped(scope, || Machine::new(bytes).run())
            .map_err(|e| malformed(0, format!("no thread to read it on: {e}")))?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Stack of the thread a pickle is read on.
pub const STACK_BYTES: usize = 64 << 20;

#[cfg(test)]
mod tests;
