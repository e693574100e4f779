//! The pieces of `transformers`' Jinja environment that minijinja does not have built in: its
//! `tojson` filter (Python's `json.dumps`, not minijinja's compact HTML-safe JSON) and the
//! `strftime_now` global. Chat templates embed tool schemas and tool-call arguments with
//! `tojson`; if our bytes differ from what transformers renders, the model is trained on a
//! format it never sees at inference (vLLM and HF both render with Python).

use minijinja::value::Kwargs;
use minijinja::{Error, ErrorKind, Value};

/// `tojson(x, indent=None, ensure_ascii=False, separators=None, sort_keys=False)` as transformers
/// defines it: `json.dumps` with those arguments.
pub fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    // Python's defaults: ", " between items on one line, "," when indenting (the newline follows).
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json =
        serde_json::to_value(value).map_err(|e| Error::new(ErrorKind::InvalidOperation, "tojson: value is not JSON").with_source(e))?;
    let style = Style { indent, item_sep, key_sep, ensure_ascii, sort_keys };
    let mut out = String::new();
    write_json(&json, &style, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct Style {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json(value: &serde_json::Value, style: &Style, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    match value {
        J::Array(items) if items.is_empty() => out.push_str("[]"),
        J::Object(map) if map.is_empty() => out.push_str("{}"),
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                separate(style, depth + 1, i == 0, out);
                write_json(item, style, depth + 1, out);
            }
            close(style, depth, out);
            out.push(']');
        }
        J::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                separate(style, depth + 1, i == 0, out);
                write_string(key, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write_json(item, style, depth + 1, out);
            }
            close(style, depth, out);
            out.push('}');
        }
        J::String(s) => write_string(s, style.ensure_ascii, out),
        // Null, bool and numbers print the same in serde_json and Python for the integers and
        // short decimals that appear in tool schemas.
        other => out.push_str(&other.to_string()),
    }
}

fn separate(style: &Style, depth: usize, first: bool, out: &mut String) {
    if !first {
        out.push_str(&style.item_sep);
    }
    if let Some(width) = style.indent {
        out.push('\n');
        out.push_str(&" ".repeat(width * depth));
    }
}

fn close(style: &Style, depth: usize, out: &mut String) {
    if let Some(width) = style.indent {
        out.push('\n');
        out.push_str(&" ".repeat(width * depth));
    }
}

fn write_string(s: &str, ensure_ascii: bool, out: &mut String) {
    // serde_json escapes exactly what Python does with ensure_ascii=False: quote, backslash,
    // \n \r \t \b \f and other control characters as \u00XX.
    let escaped = serde_json::to_string(s).expect("a string always serializes");
    if !ensure_ascii {
        out.push_str(&escaped);
        return;
    }
    for c in escaped.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}

/// `strftime_now(format)`: Llama 3.1+ templates put today's date in the system prompt. UTC,
/// because a training run should not depend on the machine's time zone.
pub fn strftime_now(format: &str) -> Result<String, Error> {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    format_utc(seconds, format)
}

const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// The subset of C `strftime` that chat templates use, for a UTC Unix time.
pub fn format_utc(unix_seconds: i64, format: &str) -> Result<String, Error> {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = WEEKDAYS[(days + 4).rem_euclid(7) as usize]; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            other => {
                let code = other.map(String::from).unwrap_or_default();
                return Err(Error::new(ErrorKind::InvalidOperation, format!("strftime_now: unsupported format `%{code}`")));
            }
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, ctx: Value) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", tojson);
        env.render_str(template, ctx).unwrap()
    }

    #[test]
    fn tojson_prints_like_python_json_dumps() {
        let tool: serde_json::Value = serde_json::from_str(
            r#"{"name": "lookup_cve", "parameters": {"type": "object", "properties": {"id": {"type": "string", "description": "<CVE id> & \"quoted\" é"}}, "required": ["id"]}}"#,
        )
        .unwrap();
        let ctx = minijinja::context! { tool => Value::from_serialize(&tool) };
        // json.dumps(tool, ensure_ascii=False): ", " and ": ", keys in insertion order, no HTML escaping.
        assert_eq!(
            render("{{ tool | tojson }}", ctx.clone()),
            r#"{"name": "lookup_cve", "parameters": {"type": "object", "properties": {"id": {"type": "string", "description": "<CVE id> & \"quoted\" é"}}, "required": ["id"]}}"#
        );
        assert_eq!(
            render(
                "{{ tool.parameters.required | tojson(indent=2) }}|{{ {} | tojson(indent=4) }}|{{ 'é' | tojson(ensure_ascii=true) }}",
                ctx
            ),
            "[\n  \"id\"\n]|{}|\"\\u00e9\""
        );
    }

    #[test]
    fn format_utc_matches_c_strftime() {
        // 2024-07-26 13:05:09 UTC, a Friday (Llama 3.1's default date string is "26 Jul 2024").
        assert_eq!(format_utc(1_721_999_109, "%d %b %Y").unwrap(), "26 Jul 2024");
        assert_eq!(format_utc(1_721_999_109, "%A %B %d, %H:%M:%S %%").unwrap(), "Friday July 26, 13:05:09 %");
        assert_eq!(format_utc(951_782_400, "%Y-%m-%d %a").unwrap(), "2000-02-29 Tue");
        assert!(format_utc(0, "%Q").is_err());
    }
}
