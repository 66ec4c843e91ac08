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

use std::collections::HashMap;

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

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Values and, alongside, how deeply each nests (a scalar is 1).
    stack: Vec<Value>,
    depths: Vec<u32>,
    marks: Vec<usize>,
    memo: HashMap<u32, (Value, u32)>,
    /// Bytes charged against [`MAX_MEMORY`] so far (never refunded).
    used: usize,
}

impl<'a> Machine<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            stack: Vec::new(),
            depths: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            used: 0,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(PickleError::Truncated(self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// Takes `n` bytes for the opcode at `at`, whose length field declared `n`.
    fn take_declared(&mut self, n: u64, at: usize) -> Result<&'a [u8], PickleError> {
        let remaining = self.bytes.len() - self.pos;
        match usize::try_from(n) {
            Ok(n) if n <= remaining => self.take(n),
            _ => Err(PickleError::Length {
                at,
                declared: n,
                remaining,
            }),
        }
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.bytes[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.pos))?;
        let text = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.pos += len + 1;
        Ok(text)
    }

    fn text(&mut self, n: u64, at: usize) -> Result<Value, PickleError> {
        let raw = self.take_declared(n, at)?;
        let s = std::str::from_utf8(raw).map_err(|e| malformed(at, e.to_string()))?;
        Ok(Value::Str(s.to_string()))
    }

    fn bytes(&mut self, n: u64, at: usize) -> Result<Value, PickleError> {
        Ok(Value::Bytes(self.take_declared(n, at)?.to_vec()))
    }

    fn charge(&mut self, n: usize, at: usize) -> Result<(), PickleError> {
        charge(&mut self.used, n, at)
    }

    /// Pushes a new value that nests `depth` levels; charges it, not its children.
    fn push(&mut self, value: Value, depth: u32, at: usize) -> Result<(), PickleError> {
        self.charge(own_cost(&value), at)?;
        self.push_charged(value, depth, at)
    }

    fn push_charged(&mut self, value: Value, depth: u32, at: usize) -> Result<(), PickleError> {
        if depth > MAX_DEPTH {
            return Err(PickleError::TooDeep { at });
        }
        self.stack.push(value);
        self.depths.push(depth);
        Ok(())
    }

    fn pop(&mut self, at: usize) -> Result<(Value, u32), PickleError> {
        match (self.stack.pop(), self.depths.pop()) {
            (Some(v), Some(d)) => Ok((v, d)),
            _ => Err(malformed(at, "stack underflow".into())),
        }
    }

    /// Pops everything above the last MARK; returns it and its deepest nesting (0 if empty).
    fn pop_mark(&mut self, at: usize) -> Result<(Vec<Value>, u32), PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| malformed(at, "no MARK".into()))?;
        if mark > self.stack.len() {
            return Err(malformed(at, "MARK above stack".into()));
        }
        let depth = self.depths.split_off(mark).into_iter().max().unwrap_or(0);
        Ok((self.stack.split_off(mark), depth))
    }

    fn top(&mut self, at: usize) -> Result<&mut Value, PickleError> {
        self.stack
            .last_mut()
            .ok_or_else(|| malformed(at, "stack underflow".into()))
    }

    /// Records that the top value now holds something nesting `depth` levels.
    fn deepen_top(&mut self, depth: u32, at: usize) -> Result<(), PickleError> {
        if depth > MAX_DEPTH {
            return Err(PickleError::TooDeep { at });
        }
        if let Some(d) = self.depths.last_mut() {
            *d = (*d).max(depth);
        }
        Ok(())
    }

    fn memo_get(&mut self, key: u32, at: usize) -> Result<(), PickleError> {
        let (value, depth) = self
            .memo
            .get(&key)
            .ok_or_else(|| malformed(at, format!("memo key {key} not set")))?;
        let (value, depth) = (copy(value, &mut self.used, at)?, *depth);
        self.push_charged(value, depth, at)
    }

    fn memo_put(&mut self, key: u32, at: usize) -> Result<(), PickleError> {
        let (Some(value), Some(&depth)) = (self.stack.last(), self.depths.last()) else {
            return Err(malformed(at, "empty stack".into()));
        };
        let value = copy(value, &mut self.used, at)?;
        self.memo.insert(key, (value, depth));
        Ok(())
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            if op == b'.' {
                return self.pop(at).map(|(v, _)| v);
            }
            self.step(op, at)?;
        }
    }

    fn step(&mut self, op: u8, at: usize) -> Result<(), PickleError> {
        match op {
            0x80 => drop(self.u8()?),  // PROTO
            0x95 => drop(self.u64()?), // FRAME: the length is only a hint; nothing is reserved
            b'(' => {
                self.charge(size_of::<usize>(), at)?;
                self.marks.push(self.stack.len());
            }
            b'}' => self.push(Value::Dict(Vec::new()), 1, at)?,
            b']' | 0x8f => self.push(Value::List(Vec::new()), 1, at)?,
            b')' => self.push(Value::Tuple(Vec::new()), 1, at)?,
            b'N' => self.push(Value::None, 1, at)?,
            0x88 => self.push(Value::Bool(true), 1, at)?,
            0x89 => self.push(Value::Bool(false), 1, at)?,
            _ => return self.step_scalar(op, at),
        }
        Ok(())
    }

    fn step_scalar(&mut self, op: u8, at: usize) -> Result<(), PickleError> {
        let value = match op {
            b'J' => Value::Int(i32::from_le_bytes(self.take(4)?.try_into().expect("4")) as i64),
            b'K' => Value::Int(self.u8()? as i64),
            b'M' => Value::Int(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            0x8a => {
                let n = self.u8()?;
                long_from_le(self.take_declared(n.into(), at)?)
            }
            0x8b => {
                let n = self.u32()?;
                long_from_le(self.take_declared(n.into(), at)?)
            }
            b'G' => Value::Float(f64::from_be_bytes(self.take(8)?.try_into().expect("8"))),
            b'I' => int_line(&self.line()?, at)?,
            b'F' => {
                let line = self.line()?;
                Value::Float(line.trim().parse().map_err(|_| malformed(at, line))?)
            }
            b'X' => {
                let n = self.u32()?;
                self.text(n.into(), at)?
            }
            0x8c => {
                let n = self.u8()?;
                self.text(n.into(), at)?
            }
            0x8d => {
                let n = self.u64()?;
                self.text(n, at)?
            }
            b'T' | b'B' => {
                let n = self.u32()?;
                self.bytes(n.into(), at)?
            }
            b'U' | b'C' => {
                let n = self.u8()?;
                self.bytes(n.into(), at)?
            }
            0x8e => {
                let n = self.u64()?;
                self.bytes(n, at)?
            }
            _ => return self.step_memo(op, at),
        };
        self.push(value, 1, at)
    }

    fn step_memo(&mut self, op: u8, at: usize) -> Result<(), PickleError> {
        match op {
            b'q' => {
                let k = self.u8()? as u32;
                self.memo_put(k, at)
            }
            b'r' => {
                let k = self.u32()?;
                self.memo_put(k, at)
            }
            0x94 => {
                let k = self.memo.len() as u32;
                self.memo_put(k, at)
            }
            b'h' => {
                let k = self.u8()? as u32;
                self.memo_get(k, at)
            }
            b'j' => {
                let k = self.u32()?;
                self.memo_get(k, at)
            }
            _ => self.step_build(op, at),
        }
    }

    fn step_build(&mut self, op: u8, at: usize) -> Result<(), PickleError> {
        let (value, depth) = match op {
            b't' => {
                let (items, d) = self.pop_mark(at)?;
                (Value::Tuple(items), d)
            }
            0x85 => {
                let (a, d) = self.pop(at)?;
                (Value::Tuple(vec![a]), d)
            }
            0x86 => {
                let (b, db) = self.pop(at)?;
                let (a, da) = self.pop(at)?;
                (Value::Tuple(vec![a, b]), da.max(db))
            }
            0x87 => {
                let (c, dc) = self.pop(at)?;
                let (b, db) = self.pop(at)?;
                let (a, da) = self.pop(at)?;
                (Value::Tuple(vec![a, b, c]), da.max(db).max(dc))
            }
            b'l' | 0x91 => {
                let (items, d) = self.pop_mark(at)?;
                (Value::List(items), d)
            }
            b'd' => {
                let (items, d) = self.pop_mark(at)?;
                (Value::Dict(pairs(items, at)?), d)
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                (Value::Global { module, name }, 0)
            }
            0x93 => {
                let (name, _) = self.pop(at)?;
                let (module, _) = self.pop(at)?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => (Value::Global { module, name }, 0),
                    _ => return Err(malformed(at, "STACK_GLOBAL needs two strings".into())),
                }
            }
            b'Q' => {
                let (id, d) = self.pop(at)?;
                (Value::PersistentId(Box::new(id)), d)
            }
            b'R' | 0x81 => {
                let (args, da) = self.pop(at)?;
                let (func, df) = self.pop(at)?;
                (call(func, args), da.max(df))
            }
            0x92 => {
                let _kwargs = self.pop(at)?;
                let (args, da) = self.pop(at)?;
                let (func, df) = self.pop(at)?;
                (call(func, args), da.max(df))
            }
            _ => return self.step_mutate(op, at),
        };
        self.push(value, depth + 1, at)
    }

    fn step_mutate(&mut self, op: u8, at: usize) -> Result<(), PickleError> {
        match op {
            b's' => {
                let (v, dv) = self.pop(at)?;
                let (k, dk) = self.pop(at)?;
                let level = dict_items(self.top(at)?, vec![(k, v)], at)?;
                self.deepen_top(level + dk.max(dv), at)
            }
            b'u' => {
                let (items, d) = self.pop_mark(at)?;
                let items = pairs(items, at)?;
                let level = dict_items(self.top(at)?, items, at)?;
                self.deepen_top(level + d, at)
            }
            b'a' => {
                let (v, d) = self.pop(at)?;
                list_items(self.top(at)?, vec![v], at)?;
                self.deepen_top(d + 1, at)
            }
            b'e' | 0x90 => {
                let (items, d) = self.pop_mark(at)?;
                list_items(self.top(at)?, items, at)?;
                self.deepen_top(d + 1, at)
            }
            b'b' => {
                let (state, d) = self.pop(at)?;
                if build(self.top(at)?, state) {
                    self.deepen_top(d + 1, at)?;
                }
                Ok(())
            }
            b'0' => self.pop(at).map(drop),
            b'1' => self.pop_mark(at).map(drop),
            b'2' => {
                let (Some(value), Some(&depth)) = (self.stack.last(), self.depths.last()) else {
                    return Err(malformed(at, "DUP on an empty stack".into()));
                };
                let value = copy(value, &mut self.used, at)?;
                self.push_charged(value, depth, at)
            }
            _ => Err(PickleError::Unsupported { op, at }),
        }
    }
}

fn charge(used: &mut usize, n: usize, at: usize) -> Result<(), PickleError> {
    *used = used.saturating_add(n);
    if *used > MAX_MEMORY {
        return Err(PickleError::TooLarge { at });
    }
    Ok(())
}

/// What `value` itself costs: its node, boxes and text, not its children.
fn own_cost(value: &Value) -> usize {
    NODE + match value {
        Value::BigInt(b) | Value::Bytes(b) => b.len(),
        Value::Str(s) => s.len(),
        Value::Global { module, name } => module.len() + name.len(),
        Value::Call { .. } => 2 * NODE,
        Value::PersistentId(_) => NODE,
        _ => 0,
    }
}

/// A deep copy of `value`, charged node by node before anything is allocated, so that
/// copying stops once [`MAX_MEMORY`] is spent. Recursion is bounded by [`MAX_DEPTH`].
fn copy(value: &Value, used: &mut usize, at: usize) -> Result<Value, PickleError> {
    charge(used, own_cost(value), at)?;
    let all = |items: &[Value], used: &mut usize| -> Result<Vec<Value>, PickleError> {
        items.iter().map(|v| copy(v, used, at)).collect()
    };
    Ok(match value {
        Value::List(items) => Value::List(all(items, used)?),
        Value::Tuple(items) => Value::Tuple(all(items, used)?),
        Value::Dict(items) => Value::Dict(
            items
                .iter()
                .map(|(k, v)| Ok((copy(k, used, at)?, copy(v, used, at)?)))
                .collect::<Result<_, PickleError>>()?,
        ),
        Value::Call { func, args, state } => Value::Call {
            func: Box::new(copy(func, used, at)?),
            args: Box::new(copy(args, used, at)?),
            state: match state {
                Some(s) => Some(Box::new(copy(s, used, at)?)),
                None => None,
            },
        },
        Value::PersistentId(id) => Value::PersistentId(Box::new(copy(id, used, at)?)),
        scalar => scalar.clone(),
    })
}

fn malformed(at: usize, reason: String) -> PickleError {
    PickleError::Malformed { at, reason }
}

fn long_from_le(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::BigInt(bytes.to_vec());
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut buf = [if negative { 0xff } else { 0 }; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

fn int_line(line: &str, at: usize) -> Result<Value, PickleError> {
    match line.trim() {
        "00" => Ok(Value::Bool(false)),
        "01" => Ok(Value::Bool(true)),
        s => s
            .parse()
            .map(Value::Int)
            .map_err(|_| malformed(at, s.to_string())),
    }
}

fn pairs(items: Vec<Value>, at: usize) -> Result<Vec<(Value, Value)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return Err(malformed(at, "odd number of dict items".into()));
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// `OrderedDict()` and `dict()` calls become plain dicts; other calls stay symbolic.
fn call(func: Value, args: Value) -> Value {
    let is_dict =
        func.is_global("collections", "OrderedDict") || func.is_global("builtins", "dict");
    if is_dict && matches!(&args, Value::Tuple(a) if a.is_empty()) {
        return Value::Dict(Vec::new());
    }
    Value::Call {
        func: Box::new(func),
        args: Box::new(args),
        state: None,
    }
}

/// SETITEM(S): adds `items` to the dict `target`, or to an object's state dict. Returns how
/// many levels below `target` the items now sit.
fn dict_items(
    target: &mut Value,
    items: Vec<(Value, Value)>,
    at: usize,
) -> Result<u32, PickleError> {
    match target {
        Value::Dict(d) => {
            d.extend(items);
            Ok(1)
        }
        // Items set on an object (e.g. a dict subclass): keep them as its state.
        Value::Call { state, .. } => {
            let entry = state.get_or_insert_with(|| Box::new(Value::Dict(Vec::new())));
            Ok(1 + dict_items(entry, items, at)?)
        }
        other => Err(malformed(at, format!("SETITEM on {}", kind(other)))),
    }
}

fn list_items(target: &mut Value, items: Vec<Value>, at: usize) -> Result<(), PickleError> {
    match target {
        Value::List(l) => {
            l.extend(items);
            Ok(())
        }
        other => Err(malformed(at, format!("APPEND on {}", kind(other)))),
    }
}

/// BUILD: dicts keep their items (an OrderedDict's `_metadata` is dropped); objects keep state.
/// Returns whether the state was kept.
fn build(target: &mut Value, new_state: Value) -> bool {
    if let Value::Call { state, .. } = target {
        *state = Some(Box::new(new_state));
        return true;
    }
    false
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) | Value::BigInt(_) => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Bytes(_) => "bytes",
        Value::List(_) => "list",
        Value::Tuple(_) => "tuple",
        Value::Dict(_) => "dict",
        Value::Global { .. } => "global",
        Value::Call { .. } => "object",
        Value::PersistentId(_) => "persistent id",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_keys_and_nested_containers_are_read() {
        // pickle.dumps({ModelCheckpoint: {'a': 1}, 'x': [1.5, True, None]}, protocol=2)
        // assembled by hand: a GLOBAL as a dict key.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend_from_slice(b"cpl.callbacks\nModelCheckpoint\n");
        p.extend_from_slice(&[b'}', 0x8c, 1, b'a', b'K', 1, b's']);
        p.extend_from_slice(&[0x8c, 1, b'x', b']', b'(', b'G']);
        p.extend_from_slice(&1.5f64.to_be_bytes());
        p.extend_from_slice(&[0x88, b'N', b'e', b'u', b'.']);
        let v = read(&p).unwrap();
        let Value::Dict(items) = &v else {
            panic!("{v:?}")
        };
        assert!(items[0].0.is_global("pl.callbacks", "ModelCheckpoint"));
        assert_eq!(items[0].1.get("a"), Some(&Value::Int(1)));
        assert_eq!(
            v.get("x"),
            Some(&Value::List(vec![
                Value::Float(1.5),
                Value::Bool(true),
                Value::None
            ]))
        );
    }

    #[test]
    fn memo_and_long_ints_round_trip() {
        // [(-2, 2**40), memo copy]
        let mut p = vec![0x80, 2, b']', b'(', b'J'];
        p.extend_from_slice(&(-2i32).to_le_bytes());
        p.extend_from_slice(&[
            0x8a, 6, 0, 0, 0, 0, 0, 1, 0x86, b'q', 7, b'h', 7, b'e', b'.',
        ]);
        let v = read(&p).unwrap();
        let pair = Value::Tuple(vec![Value::Int(-2), Value::Int(1 << 40)]);
        assert_eq!(v, Value::List(vec![pair.clone(), pair]));
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let p = [0x80, 2, b'X', 10, 0, 0, 0, b'a'];
        assert!(matches!(read(&p), Err(PickleError::Length { .. })));
        let p = [0x80, 2, b'J', 1, 0];
        assert!(matches!(read(&p), Err(PickleError::Truncated(3))));
    }

    /// `[]` memoized as key 0, then key k+1 = (key k, key k): a DAG of `n` levels whose tree
    /// has 2^n leaves.
    fn memo_bomb(levels: u8) -> Vec<u8> {
        let mut p = vec![0x80, 4, b']', b'q', 0];
        for k in 0..levels {
            p.extend_from_slice(&[b'h', k, b'h', k, 0x86, b'q', k + 1]);
        }
        p.push(b'.');
        p
    }

    #[test]
    fn memo_copies_stop_at_the_memory_limit() {
        // 64 levels would be 2^64 nodes; a few hundred bytes of stream.
        let p = memo_bomb(64);
        assert!(p.len() < 500);
        let err = read(&p).unwrap_err();
        assert!(matches!(err, PickleError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("MiB"), "{err}");
        // A few levels are fine.
        assert!(read(&memo_bomb(8)).is_ok());
    }

    #[test]
    fn dup_copies_stop_at_the_memory_limit() {
        // (x, x) built by DUP, 64 times over.
        let mut p = vec![0x80, 2, b'N'];
        for _ in 0..64 {
            p.extend_from_slice(&[b'2', 0x86]);
        }
        p.push(b'.');
        let err = read(&p).unwrap_err();
        assert!(matches!(err, PickleError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn nesting_is_refused_past_the_limit() {
        // None wrapped in 300k one-tuples.
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85, 300_000));
        p.push(b'.');
        let err = read(&p).unwrap_err();
        assert!(matches!(err, PickleError::TooDeep { .. }), "{err}");
        assert!(err.to_string().contains("1000"), "{err}");
        // 300k empty lists, each appended into the one below.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 300_000));
        p.extend(std::iter::repeat_n(b'a', 299_999));
        p.push(b'.');
        assert!(matches!(read(&p), Err(PickleError::TooDeep { .. })));
        // 300k MARKs closed by TUPLE.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', 300_000));
        p.extend(std::iter::repeat_n(b't', 300_000));
        p.push(b'.');
        assert!(matches!(read(&p), Err(PickleError::TooDeep { .. })));
    }

    #[test]
    fn nesting_up_to_the_limit_is_read() {
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85, MAX_DEPTH as usize - 1));
        p.push(b'.');
        let mut v = &read(&p).unwrap();
        let mut depth = 1;
        while let Value::Tuple(items) = v {
            v = &items[0];
            depth += 1;
        }
        assert_eq!(depth, MAX_DEPTH);
    }

    #[test]
    fn a_value_at_the_limit_is_copied_and_dropped_on_a_test_thread_stack() {
        // memo put, memo get and DUP of a 1000-deep value: recursion bounded by MAX_DEPTH.
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85, MAX_DEPTH as usize - 1));
        p.extend_from_slice(&[b'q', 0, b'h', 0, b'2', 0x87, b'.']);
        let err = read(&p).unwrap_err();
        assert!(matches!(err, PickleError::TooDeep { .. }), "{err}");
        p.truncate(p.len() - 2);
        p.extend_from_slice(b"00.");
        assert!(matches!(read(&p), Ok(Value::Tuple(_))));
    }

    #[test]
    fn nesting_through_setitem_and_build_counts() {
        let obj = b"cm\nC\n)R";
        // {1: {1: {1: ...}}}: dicts and keys pushed outside in, then SETITEM 2000 times.
        let mut dicts = vec![0x80, 2, b'}'];
        // obj.__setstate__(obj.__setstate__(...)): BUILD 2000 times.
        let mut builds = vec![0x80, 2];
        builds.extend_from_slice(obj);
        // obj[1] = obj[1] = ...: SETITEM on objects keeps the items as their state.
        let mut states = builds.clone();
        for _ in 0..2000 {
            dicts.extend_from_slice(&[b'K', 1, b'}']);
            builds.extend_from_slice(obj);
            states.extend_from_slice(&[b'K', 1]);
            states.extend_from_slice(obj);
        }
        dicts.extend(std::iter::repeat_n(b's', 2000));
        builds.extend(std::iter::repeat_n(b'b', 2000));
        states.extend(std::iter::repeat_n(b's', 2000));
        for p in [dicts, builds, states] {
            let mut p = p;
            p.push(b'.');
            let err = read(&p).unwrap_err();
            assert!(matches!(err, PickleError::TooDeep { .. }), "{err}");
        }
    }

    #[test]
    fn declared_lengths_past_the_end_are_refused_before_reading() {
        for (op, width) in [(0x8e, 8), (0x8d, 8), (b'B', 4), (b'X', 4), (0x8b, 4)] {
            let mut p = vec![0x80, 4, op];
            p.extend_from_slice(&u64::MAX.to_le_bytes()[..width]);
            p.extend_from_slice(b"abc.");
            let err = read(&p).unwrap_err();
            assert!(
                matches!(
                    err,
                    PickleError::Length {
                        at: 2,
                        remaining: 4,
                        ..
                    }
                ),
                "opcode 0x{op:02x}: {err}"
            );
            assert!(err.to_string().contains("declares"), "{err}");
        }
    }

    #[test]
    fn a_memo_copy_is_independent_of_later_changes() {
        // l = []; memo 0 = l; l.append(1); [memo 0] is the list as it was memoized.
        let p = [0x80, 2, b']', b'q', 0, b'K', 1, b'a', b'h', 0, 0x86, b'.'];
        let v = read(&p).unwrap();
        assert_eq!(
            v,
            Value::Tuple(vec![
                Value::List(vec![Value::Int(1)]),
                Value::List(Vec::new())
            ])
        );
    }

    #[test]
    fn unknown_opcode_is_named() {
        let err = read(&[0x80, 2, 0x97]).unwrap_err().to_string();
        assert!(err.contains("0x97"), "{err}");
    }
}
