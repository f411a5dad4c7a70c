//! SV1: arbitrary bytes through the line codec (whole and in chunks), each
//! line parsed as a miner's and as a pool's message; whatever parses must
//! survive our encoder and parse back to the same value.
#![no_main]

use bytes::BytesMut;
use gridproxy_fuzz::{f64_close, json_close, Input};
use gridproxy_protocol::sv1::{
    encode, parse_client, parse_server, parse_subscribe_result, ClientMethod, ClientRequest,
    LineCodec, ServerMessage, Sv1Error,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

type Lines = Vec<Result<Vec<u8>, Sv1Error>>;

/// Drain every line `buf` holds; the codec must make progress on each call.
fn drain(codec: &mut LineCodec, buf: &mut BytesMut, out: &mut Lines) {
    for _ in 0..=buf.len() + 1 {
        match codec.next_line(buf) {
            Ok(Some(l)) => out.push(Ok(l.to_vec())),
            Ok(None) => return,
            Err(e) => out.push(Err(e)),
        }
    }
    panic!("line codec made no progress");
}

fn client_close(a: &ClientRequest, b: &ClientRequest) -> bool {
    json_close(&a.id, &b.id)
        && match (&a.method, &b.method) {
            (ClientMethod::SuggestDifficulty(x), ClientMethod::SuggestDifficulty(y)) => {
                f64_close(*x, *y)
            }
            (ClientMethod::Configure(x), ClientMethod::Configure(y)) => {
                x.extensions == y.extensions
                    && x.version_rolling_mask == y.version_rolling_mask
                    && x.version_rolling_min_bits == y.version_rolling_min_bits
                    && match (x.minimum_difficulty, y.minimum_difficulty) {
                        (Some(p), Some(q)) => f64_close(p, q),
                        (p, q) => p == q,
                    }
            }
            (x, y) => x == y,
        }
}

fn encode_client(r: &ClientRequest) -> String {
    let id = &r.id;
    match &r.method {
        ClientMethod::Submit(s) => encode::submit(id, s),
        ClientMethod::Subscribe {
            user_agent,
            session_id,
        } => {
            let mut p = vec![json!(user_agent)];
            if let Some(s) = session_id {
                p.push(json!(s));
            }
            encode::request(id, "mining.subscribe", Value::Array(p))
        }
        ClientMethod::Authorize { user, password } => {
            let mut p = vec![json!(user)];
            if let Some(pw) = password {
                p.push(json!(pw));
            }
            encode::request(id, "mining.authorize", Value::Array(p))
        }
        ClientMethod::ExtranonceSubscribe => {
            encode::request(id, "mining.extranonce.subscribe", json!([]))
        }
        ClientMethod::Configure(c) => {
            let mut o = serde_json::Map::new();
            if let Some(m) = c.version_rolling_mask {
                o.insert("version-rolling.mask".into(), json!(format!("{m:08x}")));
            }
            if let Some(n) = c.version_rolling_min_bits {
                o.insert("version-rolling.min-bit-count".into(), json!(n));
            }
            if let Some(d) = c.minimum_difficulty {
                o.insert("minimum-difficulty.value".into(), json!(d));
            }
            encode::request(id, "mining.configure", json!([c.extensions, o]))
        }
        ClientMethod::SuggestDifficulty(d) => {
            encode::request(id, "mining.suggest_difficulty", json!([d]))
        }
    }
}

fn server_close(a: &ServerMessage, b: &ServerMessage) -> bool {
    match (a, b) {
        (ServerMessage::SetDifficulty(x), ServerMessage::SetDifficulty(y)) => f64_close(*x, *y),
        (
            ServerMessage::Response {
                id: i1,
                result: r1,
                error: e1,
            },
            ServerMessage::Response {
                id: i2,
                result: r2,
                error: e2,
            },
        ) => json_close(i1, i2) && json_close(r1, r2) && e1 == e2,
        (x, y) => x == y,
    }
}

/// `None`: nothing to re-encode exactly (`client.reconnect` with a later
/// parameter but not an earlier one).
fn encode_server(m: &ServerMessage) -> Option<String> {
    Some(match m {
        ServerMessage::Notify(n) => encode::notify(n),
        ServerMessage::SetDifficulty(d) => encode::set_difficulty(*d),
        ServerMessage::SetExtranonce {
            extranonce1,
            extranonce2_size,
        } => encode::set_extranonce(extranonce1, *extranonce2_size),
        ServerMessage::SetVersionMask(m) => encode::set_version_mask(*m),
        ServerMessage::Reconnect {
            host,
            port,
            wait_secs,
        } => {
            // Only a prefix of the parameters survives re-encoding.
            if port.is_some() && host.is_none() || wait_secs.is_some() && port.is_none() {
                return None;
            }
            encode::reconnect(host.as_deref(), *port, *wait_secs)
        }
        ServerMessage::Other(method) => encode::request(&Value::Null, method, json!([])),
        ServerMessage::Response { id, result, error } => {
            let error = match error {
                Some(e) => json!([e.code, e.message, null]),
                None => Value::Null,
            };
            format!("{}\n", json!({"id": id, "result": result, "error": error}))
        }
    })
}

fn check_line(line: &[u8]) {
    match parse_client(line) {
        Ok(req) => {
            let text = encode_client(&req);
            let back = parse_client(text.trim_end().as_bytes())
                .unwrap_or_else(|e| panic!("our encoding {text:?} does not parse: {e}"));
            assert!(client_close(&req, &back), "{req:?} -> {text:?} -> {back:?}");
        }
        Err(e) => {
            let _ = (e.to_string(), e.request_id());
        }
    }
    match parse_server(line) {
        Ok(msg) => {
            if let Some(text) = encode_server(&msg) {
                let back = parse_server(text.trim_end().as_bytes())
                    .unwrap_or_else(|e| panic!("our encoding {text:?} does not parse: {e}"));
                assert!(server_close(&msg, &back), "{msg:?} -> {text:?} -> {back:?}");
            }
            if let ServerMessage::Response { id, result, .. } = &msg {
                if let Some((en1, size)) = parse_subscribe_result(result) {
                    let text = encode::subscribe_result(id, "1", &en1, size);
                    let Ok(ServerMessage::Response { result, .. }) =
                        parse_server(text.trim_end().as_bytes())
                    else {
                        panic!("subscribe result {text:?} does not parse");
                    };
                    assert_eq!(parse_subscribe_result(&result), Some((en1, size)));
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let max_line = 16 + 64 * usize::from(input.byte());
    let chunk_seed = usize::from(input.byte() % 16) + 1;
    let stream = input.rest();

    // All at once.
    let mut whole = Lines::new();
    let mut codec = LineCodec::new(max_line);
    let mut buf = BytesMut::from(stream);
    drain(&mut codec, &mut buf, &mut whole);

    // In chunks of 1..=chunk_seed bytes: same lines, same errors.
    let mut chunked = Lines::new();
    let mut codec = LineCodec::new(max_line);
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut n = 0;
    while !rest.is_empty() {
        n = n % chunk_seed + 1;
        let (head, tail) = rest.split_at(n.min(rest.len()));
        buf.extend_from_slice(head);
        drain(&mut codec, &mut buf, &mut chunked);
        rest = tail;
    }
    assert_eq!(whole, chunked, "chunking changed the lines");

    for line in whole.iter().flatten() {
        assert!(!line.contains(&b'\n'));
        assert!(line.len() < max_line, "{} bytes > {max_line}", line.len());
        assert!(!line.iter().all(u8::is_ascii_whitespace));
        check_line(line);
    }
});
