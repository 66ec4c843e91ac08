//! A lenient reader for the pickle streams inside PyTorch checkpoints.
//!
//! burn's PyTorch reader refuses Lightning checkpoints because their `callbacks` dict is
//! keyed by classes. This reader builds a plain value tree instead: any value may be a dict
//! key, unknown classes stay symbolic ([`Value::Global`], [`Value::Call`]) and nothing is
//! executed. Tensor data is not in the pickle; persistent ids point into the zip archive.

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

/// Why a pickle stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// The stream ended inside an opcode.
    #[error("pickle stream ends early at byte {0}")]
    Truncated(usize),
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

/// Reads one pickle stream into a [`Value`].
pub fn read(bytes: &[u8]) -> Result<Value, PickleError> {
    Machine::new(bytes).run()
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(PickleError::Truncated(self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
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

    fn text(&mut self, n: usize, at: usize) -> Result<Value, PickleError> {
        let raw = self.take(n)?;
        let s = std::str::from_utf8(raw).map_err(|e| malformed(at, e.to_string()))?;
        Ok(Value::Str(s.to_string()))
    }

    fn pop(&mut self, at: usize) -> Result<Value, PickleError> {
        self.stack
            .pop()
            .ok_or_else(|| malformed(at, "stack underflow".into()))
    }

    fn pop_mark(&mut self, at: usize) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| malformed(at, "no MARK".into()))?;
        if mark > self.stack.len() {
            return Err(malformed(at, "MARK above stack".into()));
        }
        Ok(self.stack.split_off(mark))
    }

    fn top(&mut self, at: usize) -> Result<&mut Value, PickleError> {
        self.stack
            .last_mut()
            .ok_or_else(|| malformed(at, "stack underflow".into()))
    }

    fn memo_get(&self, key: u32, at: usize) -> Result<Value, PickleError> {
        self.memo
            .get(&key)
            .cloned()
            .ok_or_else(|| malformed(at, format!("memo key {key} not set")))
    }

    fn memo_put(&mut self, key: u32, at: usize) -> Result<(), PickleError> {
        let value = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| malformed(at, "empty stack".into()))?;
        self.memo.insert(key, value);
        Ok(())
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            if op == b'.' {
                return self.pop(at);
            }
            self.step(op, at)?;
        }
    }

    fn step(&mut self, op: u8, at: usize) -> Result<(), PickleError> {
        match op {
            0x80 => drop(self.u8()?),  // PROTO
            0x95 => drop(self.u64()?), // FRAME
            b'(' => self.marks.push(self.stack.len()),
            b'}' => self.stack.push(Value::Dict(Vec::new())),
            b']' | 0x8f => self.stack.push(Value::List(Vec::new())),
            b')' => self.stack.push(Value::Tuple(Vec::new())),
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
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
                let n = self.u8()? as usize;
                long_from_le(self.take(n)?)
            }
            0x8b => {
                let n = self.u32()? as usize;
                long_from_le(self.take(n)?)
            }
            b'G' => Value::Float(f64::from_be_bytes(self.take(8)?.try_into().expect("8"))),
            b'I' => int_line(&self.line()?, at)?,
            b'F' => {
                let line = self.line()?;
                Value::Float(line.trim().parse().map_err(|_| malformed(at, line))?)
            }
            b'X' => {
                let n = self.u32()? as usize;
                self.text(n, at)?
            }
            0x8c => {
                let n = self.u8()? as usize;
                self.text(n, at)?
            }
            0x8d => {
                let n = self.u64()? as usize;
                self.text(n, at)?
            }
            b'T' | b'B' => {
                let n = self.u32()? as usize;
                Value::Bytes(self.take(n)?.to_vec())
            }
            b'U' | b'C' => {
                let n = self.u8()? as usize;
                Value::Bytes(self.take(n)?.to_vec())
            }
            0x8e => {
                let n = self.u64()? as usize;
                Value::Bytes(self.take(n)?.to_vec())
            }
            _ => return self.step_memo(op, at),
        };
        self.stack.push(value);
        Ok(())
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
                let v = self.memo_get(k, at)?;
                self.stack.push(v);
                Ok(())
            }
            b'j' => {
                let k = self.u32()?;
                let v = self.memo_get(k, at)?;
                self.stack.push(v);
                Ok(())
            }
            _ => self.step_build(op, at),
        }
    }

    fn step_build(&mut self, op: u8, at: usize) -> Result<(), PickleError> {
        let value = match op {
            b't' => Value::Tuple(self.pop_mark(at)?),
            0x85 => {
                let a = self.pop(at)?;
                Value::Tuple(vec![a])
            }
            0x86 => {
                let b = self.pop(at)?;
                let a = self.pop(at)?;
                Value::Tuple(vec![a, b])
            }
            0x87 => {
                let c = self.pop(at)?;
                let b = self.pop(at)?;
                let a = self.pop(at)?;
                Value::Tuple(vec![a, b, c])
            }
            b'l' => Value::List(self.pop_mark(at)?),
            b'd' => Value::Dict(pairs(self.pop_mark(at)?, at)?),
            0x91 => Value::List(self.pop_mark(at)?),
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                Value::Global { module, name }
            }
            0x93 => {
                let name = self.pop(at)?;
                let module = self.pop(at)?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => Value::Global { module, name },
                    _ => return Err(malformed(at, "STACK_GLOBAL needs two strings".into())),
                }
            }
            b'Q' => Value::PersistentId(Box::new(self.pop(at)?)),
            b'R' | 0x81 => {
                let args = self.pop(at)?;
                let func = self.pop(at)?;
                call(func, args)
            }
            0x92 => {
                let _kwargs = self.pop(at)?;
                let args = self.pop(at)?;
                let func = self.pop(at)?;
                call(func, args)
            }
            _ => return self.step_mutate(op, at),
        };
        self.stack.push(value);
        Ok(())
    }

    fn step_mutate(&mut self, op: u8, at: usize) -> Result<(), PickleError> {
        match op {
            b's' => {
                let v = self.pop(at)?;
                let k = self.pop(at)?;
                dict_items(self.top(at)?, vec![(k, v)], at)
            }
            b'u' => {
                let items = pairs(self.pop_mark(at)?, at)?;
                dict_items(self.top(at)?, items, at)
            }
            b'a' => {
                let v = self.pop(at)?;
                list_items(self.top(at)?, vec![v], at)
            }
            b'e' | 0x90 => {
                let items = self.pop_mark(at)?;
                list_items(self.top(at)?, items, at)
            }
            b'b' => {
                let state = self.pop(at)?;
                build(self.top(at)?, state);
                Ok(())
            }
            b'0' => self.pop(at).map(drop),
            b'1' => self.pop_mark(at).map(drop),
            b'2' => {
                let v = self.top(at)?.clone();
                self.stack.push(v);
                Ok(())
            }
            _ => Err(PickleError::Unsupported { op, at }),
        }
    }
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

fn dict_items(
    target: &mut Value,
    items: Vec<(Value, Value)>,
    at: usize,
) -> Result<(), PickleError> {
    match target {
        Value::Dict(d) => {
            d.extend(items);
            Ok(())
        }
        // Items set on an object (e.g. a dict subclass): keep them as its state.
        Value::Call { state, .. } => {
            let entry = state.get_or_insert_with(|| Box::new(Value::Dict(Vec::new())));
            dict_items(entry, items, at)
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
fn build(target: &mut Value, new_state: Value) {
    if let Value::Call { state, .. } = target {
        *state = Some(Box::new(new_state));
    }
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
        assert!(matches!(read(&p), Err(PickleError::Truncated(_))));
    }

    #[test]
    fn unknown_opcode_is_named() {
        let err = read(&[0x80, 2, 0x97]).unwrap_err().to_string();
        assert!(err.contains("0x97"), "{err}");
    }
}
