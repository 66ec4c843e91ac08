//! The pickle machine: the opcodes over a stack, marks and a memo, each value's depth
//! tracked beside it.

use std::collections::HashMap;

use super::budget::{charge, copy, own_cost};
use super::values::*;
use super::*;

pub(super) struct Machine<'a> {
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
    pub(super) fn new(bytes: &'a [u8]) -> Self {
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

    pub(super) fn run(mut self) -> Result<Value, PickleError> {
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
