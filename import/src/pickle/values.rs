//! Building values as the opcodes ask: ints from their encodings, dict and list items,
//! calls (`OrderedDict()` as a dict), object state, and the names of kinds for errors.

use super::*;

pub(super) fn malformed(at: usize, reason: String) -> PickleError {
    PickleError::Malformed { at, reason }
}

pub(super) fn long_from_le(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::BigInt(bytes.to_vec());
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut buf = [if negative { 0xff } else { 0 }; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

pub(super) fn int_line(line: &str, at: usize) -> Result<Value, PickleError> {
    match line.trim() {
        "00" => Ok(Value::Bool(false)),
        "01" => Ok(Value::Bool(true)),
        s => s
            .parse()
            .map(Value::Int)
            .map_err(|_| malformed(at, s.to_string())),
    }
}

pub(super) fn pairs(items: Vec<Value>, at: usize) -> Result<Vec<(Value, Value)>, PickleError> {
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
pub(super) fn call(func: Value, args: Value) -> Value {
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
pub(super) fn dict_items(
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

pub(super) fn list_items(
    target: &mut Value,
    items: Vec<Value>,
    at: usize,
) -> Result<(), PickleError> {
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
pub(super) fn build(target: &mut Value, new_state: Value) -> bool {
    if let Value::Call { state, .. } = target {
        *state = Some(Box::new(new_state));
        return true;
    }
    false
}

pub(super) fn kind(v: &Value) -> &'static str {
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
