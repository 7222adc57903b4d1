//! The library's one error type: every public function of the runtime returns [`Result`].
//!
//! Errors name the field of the request or the metadata key at fault, never a command-line flag: the
//! `generate` CLI and the C ABI translate them for their users.

use std::path::PathBuf;

/// `Result<T, runtime::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field of a request is out of range or does not fit the model (`field` is the struct field's name).
    #[error("{field} {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    /// A name that is none of the choices (sampler, spacing, provider, schedule, variance, ...).
    #[error("unknown {what} '{value}' (expected one of: {expected})")]
    UnknownName { what: &'static str, value: String, expected: String },
    /// A model's metadata entry is missing, malformed or unsupported.
    #[error("metadata {key}: {reason}")]
    Metadata { key: String, reason: String },
    /// A model file that cannot be used: not ONNX, not exported by `trainer export`, wrong inputs.
    #[error("{}: {reason}", path.display())]
    Model { path: PathBuf, reason: String },
    /// The ONNX Runtime shared library cannot be found or loaded.
    #[error("{0}")]
    Library(String),
    /// ONNX Runtime refused a session, a provider or a run.
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    /// A [`Denoiser`](crate::sampler::Denoiser) implementation failed.
    #[error("the denoiser failed: {0}")]
    Denoiser(Box<dyn std::error::Error + Send + Sync>),
    /// Reading or writing a file.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// Encoding an image.
    #[error("{}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    /// A sampling run stopped by its [`Cancel`](crate::sampler::Cancel) flag.
    #[error("cancelled")]
    Cancelled,
    /// The HTTP server (`runtime::serve`) cannot start: an address, a missing token.
    #[error("{0}")]
    Serve(String),
}

impl Error {
    /// A request field's error.
    pub fn request(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidRequest { field, reason: reason.into() }
    }

    /// A metadata entry's error.
    pub fn metadata(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Metadata { key: key.into(), reason: reason.into() }
    }

    /// Wraps any error of a [`Denoiser`](crate::sampler::Denoiser) implementation.
    pub fn denoiser(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Denoiser(e.into())
    }

    /// An error of ONNX Runtime (its messages are strings).
    pub fn ort(e: impl std::fmt::Display) -> Self {
        Error::Ort(e.to_string())
    }

    /// The message as a command line reports it: a request field is named as its flag (`--field-name`).
    pub fn cli_message(&self) -> String {
        match self {
            Error::InvalidRequest { field, reason } => format!("--{} {reason}", field.replace('_', "-")),
            e => e.to_string(),
        }
    }

    /// This error about a model file.
    pub fn in_model(self, path: &std::path::Path) -> Self {
        match self {
            e @ (Error::Model { .. } | Error::Io { .. }) => e,
            e => Error::Model { path: path.to_path_buf(), reason: e.to_string() },
        }
    }
}

/// Implements `as_str`, `NAMES`, `FromStr` (unknown names are an [`Error::UnknownName`]), `Display`, serde (as
/// the name) and, with the feature `clap`, clap's `ValueEnum` for a field-less enum, from one table: the first
/// name of a variant is its canonical one, the others are accepted aliases. Settings are parsed once, where
/// they are read.
#[macro_export]
macro_rules! named_enum {
    ($ty:ident, $what:literal, { $($variant:ident => [$name:literal $(, $alias:literal)*]),+ $(,)? }) => {
        impl $ty {
            /// The canonical names, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),+];
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The canonical name.
            pub fn as_str(&self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = $crate::Error;
            fn from_str(s: &str) -> $crate::Result<Self> {
                match s {
                    $($name $(| $alias)* => Ok($ty::$variant),)+
                    _ => Err($crate::Error::UnknownName {
                        what: $what,
                        value: s.to_string(),
                        expected: Self::NAMES.join(", "),
                    }),
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::__serde::Serialize for $ty {
            fn serialize<S: $crate::__serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> $crate::__serde::Deserialize<'de> for $ty {
            fn deserialize<D: $crate::__serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                let s = <::std::string::String as $crate::__serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(<D::Error as $crate::__serde::de::Error>::custom)
            }
        }

        $crate::__named_enum_clap!($ty, { $($variant => [$name $(, $alias)*]),+ });
    };
}

/// clap's `ValueEnum` for a [`named_enum!`] (feature `clap`).
#[cfg(feature = "clap")]
#[doc(hidden)]
#[macro_export]
macro_rules! __named_enum_clap {
    ($ty:ident, { $($variant:ident => [$name:literal $(, $alias:literal)*]),+ $(,)? }) => {
        impl $crate::__clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                Self::ALL
            }
            fn to_possible_value(&self) -> Option<$crate::__clap::builder::PossibleValue> {
                Some(match self {
                    $($ty::$variant => $crate::__clap::builder::PossibleValue::new($name)$(.alias($alias))*),+
                })
            }
        }
    };
}

/// Without the feature `clap`, [`named_enum!`] implements no `ValueEnum`.
#[cfg(not(feature = "clap"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __named_enum_clap {
    ($($tt:tt)*) => {};
}
