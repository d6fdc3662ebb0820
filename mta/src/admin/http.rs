//! The little HTTP/1.1 the admin API needs: one request per connection,
//! no request bodies, `Connection: close`, bounded sizes.

/// Requests are refused above this size (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8192;

/// Responses the client reads are refused above this size.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (`+` stays `+`); `None` for a broken escape or
/// bytes that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The request line of a request head: method and target.
pub fn request_line(head: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(head).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    Some((method, target))
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        _ => "Internal Server Error",
    }
}

/// A whole response with a JSON body.
pub fn response(status: u16, body: &[u8]) -> Vec<u8> {
    // RFC 6750 §3: a 401 names the scheme the client must use.
    let challenge = if status == 401 {
        "WWW-Authenticate: Bearer realm=\"mta\"\r\n"
    } else {
        ""
    };
    let mut r = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{challenge}Connection: close\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A whole request without a body, with a bearer token.
pub fn request_with_token(method: &str, target: &str, token: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: mta\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// A whole request without a body.
pub fn request(method: &str, target: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: mta\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// Splits a response into status and body (honouring Content-Length when
/// given).
pub fn parse_response(raw: &[u8]) -> Option<(u16, &[u8])> {
    let end = memchr::memmem::find(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let body = &raw[end + 4..];
    let length = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    match length {
        Some(n) if n <= body.len() => Some((status, &body[..n])),
        Some(_) => None,
        None => Some((status, body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_coding_round_trips() {
        for s in ["a+b@x.example", "1h 30m", "ünï/&=?%"] {
            assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
        }
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("a+b").as_deref(), Some("a+b"));
    }

    #[test]
    fn request_and_response_parse() {
        let r = request("GET", "/v1/summary?by=tenant");
        assert_eq!(
            request_line(&r),
            Some(("GET".into(), "/v1/summary?by=tenant".into()))
        );
        assert_eq!(request_line(b"GET /x\r\n"), None);
        let r = response(404, b"{\"error\":\"x\"}");
        assert_eq!(parse_response(&r), Some((404, &b"{\"error\":\"x\"}"[..])));
    }
}
