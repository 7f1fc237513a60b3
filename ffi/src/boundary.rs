//! The panic boundary every exported function goes through: panics are caught here and turned
//! into [`VIW_ERR_INTERNAL`], failures into a status and a last-error message.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::status::{Failure, VIW_ERR_INTERNAL, VIW_OK, clear_last_error, set_last_error, viw_status};

/// Runs the body of the exported function `name`: clears the last error, catches panics, and
/// turns the outcome into a status.
///
/// A panic leaves the handle the call was working on in an unknown state, hence the message;
/// the library holds no other state a panic could corrupt.
pub(crate) fn call(name: &'static str, body: impl FnOnce() -> Result<(), Failure>) -> viw_status {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => VIW_OK,
        Ok(Err(failure)) => {
            set_last_error(format!("{name}: {}", failure.message));
            failure.status
        }
        Err(_) => {
            set_last_error(format!("{name}: internal error; the handle it was given may only be freed"));
            VIW_ERR_INTERNAL
        }
    }
}

/// Runs the body of a function that returns a value rather than a status (a length, a static
/// string, nothing), returning `fallback` if it panics.
pub(crate) fn catch_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{VIW_ERR_BAD_MAC, viw_last_error};

    fn last_error() -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: `buf` is valid for its length.
        let len = unsafe { viw_last_error(buf.as_mut_ptr().cast(), buf.len()) };
        String::from_utf8_lossy(&buf[..len.min(255)]).into_owned()
    }

    #[test]
    fn a_panic_becomes_an_internal_error_and_a_message() {
        let status = call("viw_test", || panic!("bug"));
        assert_eq!(status, VIW_ERR_INTERNAL);
        assert!(last_error().starts_with("viw_test: internal error"), "{}", last_error());
        assert_eq!(catch_value(7, || panic!("bug")), 7);
    }

    #[test]
    fn a_failure_sets_the_message_and_a_success_clears_it() {
        assert_eq!(call("viw_test", || Err(Failure::new(VIW_ERR_BAD_MAC, "forged"))), VIW_ERR_BAD_MAC);
        assert_eq!(last_error(), "viw_test: forged");
        assert_eq!(call("viw_test", || Ok(())), VIW_OK);
        assert_eq!(last_error(), "");
    }
}
