//! What decoding costs against [`MAX_MEMORY`]: every value charged before it is allocated,
//! deep copies (the memo's and DUP's) charged node by node.

use super::*;

pub(super) fn charge(used: &mut usize, n: usize, at: usize) -> Result<(), PickleError> {
    *used = used.saturating_add(n);
    if *used > MAX_MEMORY {
        return Err(PickleError::TooLarge { at });
    }
    Ok(())
}

/// What `value` itself costs: its node, boxes and text, not its children.
pub(super) fn own_cost(value: &Value) -> usize {
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
pub(super) fn copy(value: &Value, used: &mut usize, at: usize) -> Result<Value, PickleError> {
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
