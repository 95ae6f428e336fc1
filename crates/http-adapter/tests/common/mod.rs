//! Helpers shared by the HTTP tests: a strict parser of the Prometheus text exposition format
//! (what `/metrics` answers), so tests read values instead of matching substrings.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// `# TYPE` per metric family.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses `text`; fails on anything the format does not allow (a sample before its
    /// family's TYPE line, a second TYPE for one family, bad escapes, bad values).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut e = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| err("bad TYPE"))?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(err("unknown type"));
                }
                if e.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                    return Err(err("second TYPE line"));
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let s = parse_sample(line).map_err(|m| err(&m))?;
            if e.family_of(&s.name).is_none() {
                return Err(err("sample without a TYPE line"));
            }
            e.samples.push(s);
        }
        Ok(e)
    }

    /// The family (TYPE line) a sample or metric name belongs to: itself, or the histogram
    /// whose `_bucket`, `_sum` or `_count` series it is.
    pub fn family_of(&self, name: &str) -> Option<&str> {
        if let Some((k, _)) = self.types.get_key_value(name) {
            return Some(k);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            match self.types.get_key_value(base) {
                Some((k, t)) if t == "histogram" || t == "summary" => Some(k.as_str()),
                _ => None,
            }
        })
    }

    /// The value of the sample `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like [`Exposition::value`], 0 when the series does not exist yet.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// Samples named `name` (any labels).
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if !valid {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let eq = r.find("=\"").ok_or("bad label")?;
            let key = &r[..eq];
            if key.is_empty()
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || key.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(format!("bad label name {key:?}"));
            }
            let mut value = String::new();
            let mut it = r[eq + 2..].char_indices();
            let end = loop {
                match it.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match it.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, '\n') => return Err("newline in label value".into()),
                    (_, c) => value.push(c),
                }
            };
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            r = &r[eq + 2 + end + 1..];
            r = r.strip_prefix(',').unwrap_or(r);
        }
        rest = r;
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = value.split(' ').next().unwrap_or(value); // an optional timestamp follows
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|e| format!("bad value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}
