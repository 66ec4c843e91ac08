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
