//! The repository names `_catalog` pages through, kept in memory so a
//! request does not list every key under `repositories/` (on S3 a listing
//! of the whole bucket, on disk a walk of the whole tree).
//!
//! The set is listed again on demand once it is older than [`REFRESH`]:
//! concurrent requests then share one listing ([`Flights`]), so there is at
//! most one listing per interval however many requests come. A repository
//! this process links a manifest for is added at once ([`Catalog::note`]);
//! one another replica links (S3) shows after the next listing, and one
//! collected here goes at once ([`Catalog::invalidate`]).
//!
//! Bound: at most [`MAX_REPOSITORIES`] names are kept (one `String` each,
//! a few MiB). A storage holding more is listed for each request again
//! (still one listing for concurrent requests), as before this cache.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cache::tags::Page;
use crate::singleflight::Flights;

/// How old a listing may be before a request lists again: how long a
/// repository another replica cached may be missing from this one's
/// catalog.
pub const REFRESH: Duration = Duration::from_secs(5);
/// The most names kept between requests.
pub const MAX_REPOSITORIES: usize = 100_000;
/// How long one listing may run before its waiters get an error.
const LISTING_DEADLINE: Duration = Duration::from_secs(120);

pub type Names = Arc<BTreeSet<String>>;
pub type Listing = Result<Names, String>;

#[derive(Default)]
struct State {
    names: BTreeSet<String>,
    /// When the listing behind `names` started; `None` when there is no
    /// usable one (never listed, too many names, something was removed).
    listed_at: Option<Instant>,
    /// Names noted while a listing runs, which it may have missed; `Some`
    /// exactly while one is under way.
    noted_during_listing: Option<BTreeSet<String>>,
    /// Counts listings started, so a listing ended past its deadline
    /// clears only its own mark ([`ListingUnderWay`]).
    listings_started: u64,
}

/// Marks a listing as under way while it lives: dropped when the listing
/// ends, however it ends (its deadline included, when the listing task is
/// dropped before keeping anything), so [`Catalog::listing`] never stays
/// true for a listing that is gone.
struct ListingUnderWay {
    catalog: Arc<Catalog>,
    id: u64,
}

impl ListingUnderWay {
    fn start(catalog: &Arc<Catalog>) -> Self {
        let mut state = catalog.state();
        state.listings_started += 1;
        state.noted_during_listing = Some(BTreeSet::new());
        Self {
            catalog: Arc::clone(catalog),
            id: state.listings_started,
        }
    }
}

impl Drop for ListingUnderWay {
    fn drop(&mut self) {
        let mut state = self.catalog.state();
        if state.listings_started == self.id {
            state.noted_during_listing = None;
        }
    }
}

/// How old the listing behind a page may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Age {
    /// Younger than the refresh interval (`_catalog`).
    Fresh,
    /// Whatever is kept, however old (the dashboard, while a new listing
    /// runs behind); never when none is kept (never listed, or more names
    /// than the bound).
    Kept,
}

pub struct Catalog {
    state: Mutex<State>,
    listings: Flights<(), Listing>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").finish_non_exhaustive()
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Self::with_listing_deadline(LISTING_DEADLINE)
    }
}

impl Catalog {
    fn with_listing_deadline(deadline: Duration) -> Self {
        Self {
            state: Mutex::default(),
            listings: Flights::new(deadline),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("catalog lock")
    }

    /// A page of the kept names the client may see, if the listing
    /// behind them is as recent as `age` asks.
    pub fn kept_page(
        &self,
        age: Age,
        n: Option<usize>,
        last: Option<&str>,
        visible: impl Fn(&str) -> bool,
    ) -> Option<Page> {
        let state = self.state();
        let usable = match age {
            Age::Fresh => state.listed_at.is_some_and(|at| at.elapsed() < REFRESH),
            Age::Kept => state.listed_at.is_some() || !state.names.is_empty(),
        };
        usable.then(|| page(&state.names, n, last, visible))
    }

    /// Runs `list` unless a listing is under way already (then joins it),
    /// and keeps its result (within the bound).
    pub async fn relist<F>(self: &Arc<Self>, list: F) -> Listing
    where
        F: Future<Output = Result<BTreeSet<String>, String>> + Send + 'static,
    {
        let catalog = Arc::clone(self);
        let listing = self
            .listings
            .run((), move || async move {
                let started = Instant::now();
                let _under_way = ListingUnderWay::start(&catalog);
                crate::metrics::metrics().catalog_listings.inc();
                let listed = list.await;
                catalog.keep(started, listed)
            })
            .await;
        listing.unwrap_or_else(|| Err("listing repositories took too long".to_owned()))
    }

    fn keep(&self, started: Instant, listed: Result<BTreeSet<String>, String>) -> Listing {
        let mut state = self.state();
        let noted = state.noted_during_listing.take().unwrap_or_default();
        let mut names = listed?;
        names.extend(noted);
        if names.len() <= MAX_REPOSITORIES {
            state.names = names.clone();
            state.listed_at = Some(started);
        } else {
            tracing::warn!(
                repositories = names.len(),
                max = MAX_REPOSITORIES,
                "too many repositories to keep the catalog in memory; listing per request"
            );
            state.names = BTreeSet::new();
            state.listed_at = None;
        }
        Ok(Arc::new(names))
    }

    /// Whether a listing is under way.
    pub fn listing(&self) -> bool {
        self.state().noted_during_listing.is_some()
    }

    /// A repository this process just linked a manifest for.
    pub fn note(&self, repository: &str) {
        let mut state = self.state();
        if let Some(noted) = &mut state.noted_during_listing {
            noted.insert(repository.to_owned());
        }
        let known = state.names.contains(repository);
        if state.listed_at.is_some() && !known && state.names.len() < MAX_REPOSITORIES {
            state.names.insert(repository.to_owned());
        } else if !known {
            // Over the bound: the next request lists instead.
            state.listed_at = None;
        }
    }

    /// Something was removed: the next request lists again.
    pub fn invalidate(&self) {
        self.state().listed_at = None;
    }
}

/// Paging as the distribution spec defines it: names after `last`, at most
/// `n` of them, counting only those the client may see (so a page is short
/// only at the end). One pass over the names after `last` at most: the
/// set is bounded ([`MAX_REPOSITORIES`] in memory, else one listing).
pub fn page(
    names: &BTreeSet<String>,
    n: Option<usize>,
    last: Option<&str>,
    visible: impl Fn(&str) -> bool,
) -> Page {
    let after = last.map_or(Bound::Unbounded, Bound::Excluded);
    let mut rest = names
        .range::<str, _>((after, Bound::Unbounded))
        .filter(|name| visible(name));
    let take = n.unwrap_or(usize::MAX);
    let items: Vec<String> = rest.by_ref().take(take).cloned().collect();
    Page {
        items,
        more: rest.next().is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A listing that overruns its deadline is no longer under way, so
    /// the dashboard's background relisting starts again; one that ends
    /// keeps the names noted meanwhile.
    #[tokio::test]
    async fn a_listing_ends_under_way_however_it_ends() {
        let catalog = Arc::new(Catalog::with_listing_deadline(Duration::from_millis(50)));
        let overran = catalog.relist(std::future::pending()).await;
        assert!(overran.is_err());
        assert!(
            !catalog.listing(),
            "a listing past its deadline still under way"
        );

        let noting = Arc::clone(&catalog);
        let listed = catalog
            .relist(async move {
                assert!(noting.listing());
                noting.note("noted/meanwhile");
                Ok(names(&["listed"]))
            })
            .await
            .unwrap();
        assert_eq!(*listed, names(&["listed", "noted/meanwhile"]));
        assert!(!catalog.listing());
    }

    #[test]
    fn pages_follow_last_and_n() {
        let all = names(&["a", "b/c", "d"]);
        let first = page(&all, Some(2), None, |_| true);
        assert_eq!(
            (first.items.as_slice(), first.more),
            (&["a".to_owned(), "b/c".to_owned()][..], true)
        );
        let rest = page(&all, Some(2), Some("b/c"), |_| true);
        assert_eq!((rest.items, rest.more), (vec!["d".to_owned()], false));
        assert!(page(&all, Some(0), None, |_| true).items.is_empty());
    }

    #[test]
    fn filtered_pages_are_full_until_the_last() {
        let all: BTreeSet<String> = (0..1000).map(|i| format!("r{i:04}")).collect();
        let visible = |name: &str| name.ends_with('7');
        let mut last = None;
        let mut seen = Vec::new();
        loop {
            let page = page(&all, Some(30), last.as_deref(), visible);
            if page.more {
                assert_eq!(page.items.len(), 30, "no short page while more exist");
            }
            seen.extend(page.items.iter().cloned());
            last = page.items.last().cloned();
            if !page.more {
                break;
            }
        }
        assert_eq!(seen.len(), 100);
        assert!(seen.iter().all(|name| visible(name)));
        let hidden_last = page(&all, Some(5), Some("r0008"), visible);
        assert_eq!(hidden_last.items[0], "r0017", "a hidden `last` still pages");
    }

    #[tokio::test]
    async fn a_noted_repository_shows_at_once_and_one_noted_while_listing_is_kept() {
        let catalog = Arc::new(Catalog::default());
        assert!(
            catalog
                .kept_page(Age::Fresh, None, None, |_| true)
                .is_none(),
            "never listed"
        );
        catalog.note("early");
        let during = Arc::clone(&catalog);
        let listed = catalog
            .relist(async move {
                during.note("during");
                Ok(names(&["listed"]))
            })
            .await
            .unwrap();
        assert_eq!(*listed, names(&["during", "listed"]));
        catalog.note("after");
        let page = catalog
            .kept_page(Age::Fresh, None, None, |_| true)
            .expect("fresh");
        assert_eq!(page.items, ["after", "during", "listed"]);
        catalog.invalidate();
        assert!(
            catalog
                .kept_page(Age::Fresh, None, None, |_| true)
                .is_none()
        );
        let kept = catalog
            .kept_page(Age::Kept, None, None, |_| true)
            .expect("kept for the dashboard");
        assert_eq!(kept.items, ["after", "during", "listed"]);
    }
}
